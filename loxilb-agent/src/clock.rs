//! Calibration of the datapath's clock (`loxilb_common::Clock`): the
//! datapath tells the time from the jiffies counter (one inlined load)
//! instead of calling `bpf_ktime_get_coarse_ns()` on every packet; this
//! fits `jiffies * ns_per_jiffy + offset` to the coarse monotonic clock
//! from samples of both read in the same tick (the `loxilb_clock`
//! program). Pure arithmetic here; the samples are taken by
//! `Datapath::calibrate_clock`.

/// The tick rates Linux is built with (`CONFIG_HZ`), most common first.
const HZ_CHOICES: [u64; 8] = [250, 1000, 100, 300, 200, 500, 1024, 128];

/// `bpf_jiffies64()` and `bpf_ktime_get_coarse_ns()` read together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub jiffies: u64,
    pub coarse_ns: u64,
}

/// A fitted clock: the datapath's time is `jiffies * ns_per_jiffy +
/// offset_ns` (wrapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fit {
    pub hz: u64,
    pub ns_per_jiffy: u64,
    pub offset_ns: u64,
}

impl Fit {
    /// The `LB_CLOCK` value that makes the datapath read this clock.
    pub fn clock(&self) -> loxilb_common::Clock {
        loxilb_common::Clock {
            ns_per_jiffy: self.ns_per_jiffy,
            offset_ns: self.offset_ns,
            ..Default::default()
        }
    }

    /// The time the datapath reads at `jiffies` (`Clock::at`, the one
    /// formula it uses).
    pub fn at(&self, jiffies: u64) -> u64 {
        self.clock().at(jiffies)
    }

    /// How far the fitted clock is from `s`'s coarse clock, ns.
    pub fn error_ns(&self, s: Sample) -> u64 {
        (self.at(s.jiffies).wrapping_sub(s.coarse_ns) as i64).unsigned_abs()
    }
}

/// The kernel's `TICK_NSEC` for `hz`.
pub const fn tick_ns(hz: u64) -> u64 {
    (1_000_000_000 + hz / 2) / hz
}

/// Fit the clock to `samples`, taken over at least a few ticks, first to
/// last. The tick length is the coarse clock's advance per jiffy between
/// the first and the last sample, taken as the nearest of the tick rates
/// Linux is built with (within 1 %); the offset is the largest of the
/// samples' (the jiffies counter moves a little before the coarse clock
/// in a tick, so a sample taken in between reads the clock one tick
/// behind).
pub fn fit(samples: &[Sample]) -> Result<Fit, String> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Err("no clock samples".into());
    };
    let dj = last.jiffies.wrapping_sub(first.jiffies);
    let dns = last.coarse_ns.wrapping_sub(first.coarse_ns);
    if !(2..=1 << 32).contains(&dj) || dns > 1 << 62 {
        return Err(format!(
            "the clock samples span {dj} jiffies and {dns} ns; at least 2 jiffies are needed"
        ));
    }
    let per = dns as f64 / dj as f64;
    let Some(hz) = HZ_CHOICES.into_iter().find(|&hz| {
        let t = tick_ns(hz) as f64;
        (per - t).abs() <= t * 0.01
    }) else {
        return Err(format!(
            "the coarse clock advanced {per:.0} ns per jiffy, which is no tick rate Linux is \
             built with ({HZ_CHOICES:?} Hz)"
        ));
    };
    let ns_per_jiffy = tick_ns(hz);
    let offset = |s: &Sample| {
        s.coarse_ns
            .wrapping_sub(s.jiffies.wrapping_mul(ns_per_jiffy))
    };
    let o0 = offset(first);
    let offset_ns = samples
        .iter()
        .map(offset)
        .max_by_key(|o| o.wrapping_sub(o0) as i64)
        .unwrap_or(o0);
    let f = Fit {
        hz,
        ns_per_jiffy,
        offset_ns,
    };
    // Every sample within two ticks of the fit (a clock that does not
    // advance with the jiffies, e.g. adjusted between the samples, fails).
    if let Some(s) = samples.iter().find(|s| f.error_ns(**s) > 2 * ns_per_jiffy) {
        return Err(format!(
            "the coarse clock does not follow the jiffies counter at {hz} Hz: {s:?} is {} ns \
             off the fit",
            f.error_ns(*s)
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jiffies start 300 s before wrapping 32 bits, as the kernel's do.
    const J0: u64 = (-(300i64 * 250)) as u32 as u64;

    fn s(jiffies: u64, coarse_ns: u64) -> Sample {
        Sample { jiffies, coarse_ns }
    }

    #[test]
    fn a_250_hz_clock_is_fitted_to_the_coarse_clock() {
        let boot = 7_000_000_000u64;
        let samples: Vec<Sample> = (0..5)
            .map(|i| s(J0 + 1000 + i, boot + (1000 + i) * 4_000_000))
            .collect();
        let f = fit(&samples).unwrap();
        assert_eq!((f.hz, f.ns_per_jiffy), (250, 4_000_000));
        for x in &samples {
            assert_eq!(f.error_ns(*x), 0, "{x:?}");
        }
        // An hour on, the fit still reads the coarse clock.
        let later = s(J0 + 1000 + 900_000, boot + (1000 + 900_000) * 4_000_000);
        assert_eq!(f.at(later.jiffies), later.coarse_ns);
    }

    #[test]
    fn a_sample_read_between_the_jiffies_and_the_clock_update_does_not_skew_the_offset() {
        let boot = 1_000_000u64;
        let mut samples: Vec<Sample> = (0..5)
            .map(|i| s(J0 + 10 + i * 2, boot + (10 + i * 2) * 1_000_000))
            .collect();
        // The coarse clock one tick behind the jiffies in the middle one.
        samples[2].coarse_ns -= 1_000_000;
        let f = fit(&samples).unwrap();
        assert_eq!(f.hz, 1000);
        assert_eq!(f.error_ns(samples[0]), 0);
        assert_eq!(f.error_ns(samples[2]), 1_000_000);
    }

    #[test]
    fn a_tick_jitter_of_a_few_microseconds_still_finds_the_rate() {
        // HZ 1000 measured over 3 ticks with 20 us of jitter.
        let f = fit(&[s(5, 5_000_000), s(8, 8_020_000)]).unwrap();
        assert_eq!(f.hz, 1000);
        let f = fit(&[s(5, 20_000_000), s(8, 29_990_000)]).unwrap();
        assert_eq!((f.hz, f.ns_per_jiffy), (300, 3_333_333));
    }

    #[test]
    fn samples_that_fit_no_tick_rate_are_refused_with_the_reason() {
        assert!(fit(&[]).unwrap_err().contains("no clock samples"));
        let e = fit(&[s(5, 0), s(6, 4_000_000)]).unwrap_err();
        assert!(e.contains("at least 2 jiffies"), "{e}");
        let e = fit(&[s(5, 0), s(15, 70_000_000)]).unwrap_err();
        assert!(e.contains("7000000 ns per jiffy"), "{e}");
        // A clock stepped between samples.
        let e = fit(&[s(0, 0), s(1, 4_000_000 + 50_000_000), s(4, 16_000_000)]).unwrap_err();
        assert!(e.contains("does not follow"), "{e}");
    }
}
