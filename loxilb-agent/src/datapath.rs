//! The agent's datapath API: loads the eBPF object, pins/adopts its maps,
//! attaches it to interfaces and reads/writes the maps. Everything that
//! touches the kernel's BPF objects goes through here (the packet tests and
//! benchmarks use this same API).

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues, ProgramArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use ipnet::IpNet;
use loxilb_common::{
    addr_from_ip, ip_from_addr, map_names as mn, prog_names, stat, Addr, AffKey, AffVal, AssocKey,
    AssocVal, Clock, CtKey, CtVal, DevFwd, EpIndex, EpKey, EpStats, EpVal, GlobalCfg, RuleStats,
    RuleVips, SelChunk, SrcRangeData, SvcKey, SvcVal, LAYOUT_VERSION, MAX_RULE_VIPS,
};

use crate::rules::{Installed, RuleTable};

/// The compiled datapath (built by build.rs through aya-build).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loxilb"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/loxilb";

/// How long past its idle timeout a session must be before
/// [`Datapath::expire_idle`] removes it (the datapath's coarse clock and
/// a packet in flight are never raced).
pub const EXPIRY_GRACE_NS: u64 = 2_000_000_000;

/// How to attach XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode if the driver supports it, else generic.
    Auto,
    Native,
    Generic,
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" | "driver" => Ok(Self::Native),
            "generic" | "skb" => Ok(Self::Generic),
            _ => Err(format!(
                "{s:?} is not an XDP mode; use auto, native or generic"
            )),
        }
    }
}

struct Attached {
    iface: String,
    id: aya::programs::xdp::XdpLinkId,
    program: &'static str,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// True when the maps existed before this load (sessions adopted).
    adopted: bool,
    attached: Vec<Attached>,
    /// TC egress attachments (ICMP error translation).
    egress: Vec<(String, aya::programs::tc::SchedClassifierLinkId)>,
    /// The datapath's clock as last calibrated (None: it calls
    /// `bpf_ktime_get_coarse_ns()` per packet).
    clock: Option<crate::clock::Fit>,
    /// When a calibration last failed ([`Self::check_clock`] waits
    /// `CLOCK_RETRY` before the next try).
    clock_failed: Option<std::time::Instant>,
}

/// How long [`Datapath::check_clock`] waits after a failed calibration.
const CLOCK_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

fn is_bpffs(path: &Path) -> bool {
    // BPF_FS_MAGIC
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Where bpffs is mounted when none is (see [`ensure_bpffs`]).
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Make sure the pin directory `dir` can live on a BPF filesystem. When
/// its nearest existing ancestor is not on one and `dir` is under
/// `/sys/fs/bpf` (a fresh mount namespace: `ip netns exec`, a container
/// without the host's bpffs), mount a bpffs at `/sys/fs/bpf`, as Cilium
/// does. Anywhere else, refuse with the command that would mount one.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    if is_bpffs(existing) {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if !dir.starts_with(root) {
        bail!(
            "the pin directory {} is not on a BPF filesystem; mount one (`mkdir -p {d} && mount -t \
             bpf bpf {d}`) or use a --pin-dir under {BPFFS_ROOT}",
            dir.display(),
            d = dir.display()
        );
    }
    if !root.is_dir() {
        bail!(
            "no BPF filesystem at {BPFFS_ROOT} and no such directory to mount one on (is sysfs \
             mounted at /sys?); mount one (`mount -t bpf bpf {BPFFS_ROOT}`) or pass --pin-dir"
        );
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype, opts) = (c("bpf"), c(BPFFS_ROOT), c("bpf"), c("mode=0700"));
    // SAFETY: every pointer is a valid NUL-terminated string for the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr() as *const libc::c_void,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        bail!(
            "no BPF filesystem at {BPFFS_ROOT}, and mounting one failed ({e}); mount it \
             (`mount -t bpf bpf {BPFFS_ROOT}`; in a container, mount the host's {BPFFS_ROOT}) or \
             run the agent with CAP_SYS_ADMIN"
        );
    }
    tracing::warn!(
        "no BPF filesystem was mounted at {BPFFS_ROOT}: mounted one. Its pins live as long as this \
         mount namespace; for --keep to carry sessions across restarts (a container), mount the \
         host's {BPFFS_ROOT} instead"
    );
    Ok(())
}

impl Datapath {
    /// Load the datapath. With `pin_dir`, maps are pinned there (and maps
    /// already pinned there are adopted, sessions included); without, the
    /// maps are private to this process (tests, benchmarks).
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_programs(pin_dir, None)
    }

    /// Only the IPIP decapsulation program (`loxilb-agent decap`): the
    /// load-balancing programs are not verified at all (seconds saved).
    pub fn load_decap() -> Result<Self> {
        Self::load_programs(None, Some(&[prog_names::XDP_DECAP]))
    }

    fn load_programs(pin_dir: Option<&Path>, only: Option<&[&str]>) -> Result<Self> {
        let wanted = |name: &str| only.is_none_or(|o| o.contains(&name));
        let mut adopted = false;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => {
                ensure_bpffs(dir)?;
                std::fs::create_dir_all(dir).with_context(|| {
                    format!("cannot create the pin directory {}", dir.display())
                })?;
                if !is_bpffs(dir) {
                    bail!(
                        "{} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` \
                         or pass another --pin-dir",
                        dir.display()
                    );
                }
                let existing = mn::ALL.iter().filter(|n| dir.join(n).exists()).count();
                if existing > 0 && existing < mn::ALL.len() {
                    bail!(
                        "{} holds only some of the datapath maps ({existing} of {}); it is not a state \
                         this agent can adopt. Remove it (`rm -r {}`) and start again",
                        dir.display(),
                        mn::ALL.len(),
                        dir.display()
                    );
                }
                adopted = existing == mn::ALL.len();
                if adopted {
                    check_pinned_layout(dir)?;
                }
                mn::ALL.iter().map(|n| (*n, dir.join(n))).collect()
            }
            None => vec![],
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF datapath into the kernel failed")?;
        // Every program of a hook: its entry points and what its tail-call
        // array holds.
        let xdp_progs = [
            prog_names::XDP_MAIN,
            prog_names::XDP_PASS,
            prog_names::XDP_DECAP,
            prog_names::XDP_CLOCK,
        ]
        .into_iter()
        .chain(prog_names::XDP_JUMPS.iter().map(|(_, n)| *n));
        let tc_progs = [prog_names::TC_MAIN, prog_names::TC_EGRESS]
            .into_iter()
            .chain(prog_names::TC_JUMPS.iter().map(|(_, n)| *n));
        let names: Vec<&str> = xdp_progs.chain(tc_progs).filter(|n| wanted(n)).collect();
        load_in_parallel(&mut ebpf, &names)?;
        // Each hook's programs hand IPv6 packets and new flows on by tail
        // calls.
        let jumps = prog_names::XDP_JUMPS
            .iter()
            .map(|j| (mn::JMP_XDP, *j))
            .chain(prog_names::TC_JUMPS.iter().map(|j| (mn::JMP_TC, *j)));
        for (array, (slot, prog)) in jumps {
            if !wanted(prog) {
                continue;
            }
            let fd = ebpf
                .program(prog)
                .ok_or_else(|| anyhow!("program {prog} missing"))?
                .fd()?
                .try_clone()?;
            let mut jmp: ProgramArray<_> = ProgramArray::try_from(
                ebpf.map_mut(array)
                    .ok_or_else(|| anyhow!("map {array} missing from the eBPF object"))?,
            )?;
            jmp.set(slot, &fd, 0)
                .with_context(|| format!("installing {prog} in {array}"))?;
        }
        let mut dp = Datapath {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            adopted,
            attached: vec![],
            egress: vec![],
            clock: None,
            clock_failed: None,
        };
        if wanted(prog_names::XDP_CLOCK) {
            // Not fatal: uncalibrated, the datapath asks the kernel's coarse
            // clock on every packet (correct, ~10-30 ns slower).
            match dp.calibrate_clock() {
                Ok(f) => tracing::debug!(
                    hz = f.hz,
                    "datapath clock: the jiffies counter, calibrated against CLOCK_MONOTONIC_COARSE"
                ),
                Err(e) => tracing::warn!(
                    "the datapath clock could not be calibrated ({e:#}); the datapath reads \
                     the kernel's coarse clock on every packet instead, which is slower"
                ),
            }
        }
        if !adopted {
            dp.set_config(GlobalCfg {
                layout_version: LAYOUT_VERSION,
                flags: 0,
                fullnat_src: 0,
                snat_port_lo: loxilb_common::SNAT_PORT_LO,
                snat_port_hi: loxilb_common::SNAT_PORT_HI,
                fullnat_src6: [0; 4],
                new_flow_interval_ns: 0,
                new_flow_burst: 0,
            })?;
        }
        Ok(dp)
    }

    pub fn adopted(&self) -> bool {
        self.adopted
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    fn map(&self, name: &str) -> Result<&Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    /// One reading of the kernel's clocks, taken in one tick by the
    /// `loxilb_clock` program.
    fn clock_sample(&mut self) -> Result<crate::clock::Sample> {
        use aya::programs::{TestRun, TestRunOptions};
        let input = [0u8; 64];
        let r = self
            .xdp_program(prog_names::XDP_CLOCK)?
            .test_run(TestRunOptions {
                data_in: Some(&input),
                ..Default::default()
            })
            .context("running loxilb_clock with BPF_PROG_TEST_RUN")?;
        const XDP_PASS: u32 = 2;
        if r.return_value != XDP_PASS {
            bail!("loxilb_clock found the jiffies counter moving on every try");
        }
        let a: Array<_, Clock> = Array::try_from(self.map(mn::CLOCK)?)?;
        let c = a.get(&0, 0)?;
        Ok(crate::clock::Sample {
            jiffies: c.sample_jiffies,
            coarse_ns: c.sample_coarse_ns,
        })
    }

    /// Fit the datapath's clock (`loxilb_common::Clock`) to the kernel's
    /// coarse monotonic clock over 8 ticks (32 ms at 250 Hz) and install
    /// it. Done by every load; [`Self::check_clock`] keeps it right.
    pub fn calibrate_clock(&mut self) -> Result<crate::clock::Fit> {
        let r = self.fit_clock();
        self.clock_failed = r.is_err().then(std::time::Instant::now);
        if r.is_err() && self.clock.is_some() && self.write_clock(Clock::default()).is_ok() {
            // A fit found wrong and not mended: back to the helper.
            self.clock = None;
        }
        r
    }

    fn fit_clock(&mut self) -> Result<crate::clock::Fit> {
        let first = self.clock_sample()?;
        let mut samples = vec![first];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while samples
            .last()
            .is_some_and(|s| s.jiffies.wrapping_sub(first.jiffies) < 8)
        {
            if std::time::Instant::now() > deadline {
                bail!(
                    "the jiffies counter moved {} times in 1 s",
                    samples
                        .last()
                        .map_or(0, |s| s.jiffies.wrapping_sub(first.jiffies))
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            let s = self.clock_sample()?;
            if samples.last().is_some_and(|l| l.jiffies != s.jiffies) {
                samples.push(s);
            }
        }
        let f = crate::clock::fit(&samples).map_err(|e| anyhow!(e))?;
        self.set_clock(f)?;
        Ok(f)
    }

    /// Install a fitted clock (as [`Self::calibrate_clock`] does; tests
    /// install wrong ones to see them found).
    pub fn set_clock(&mut self, f: crate::clock::Fit) -> Result<()> {
        self.write_clock(f.clock())?;
        self.clock = Some(f);
        Ok(())
    }

    fn write_clock(&mut self, c: Clock) -> Result<()> {
        array_put(self, mn::CLOCK, 0, c)
    }

    /// The datapath's clock as calibrated (None: not calibrated; it asks
    /// the kernel's coarse clock on every packet).
    pub fn clock(&self) -> Option<crate::clock::Fit> {
        self.clock
    }

    /// Compare the datapath's clock with the kernel's coarse clock (one
    /// sample) and calibrate again if they are more than two ticks apart
    /// (or it never was: then at most once a minute). Returns the gap
    /// found, ns (`u64::MAX`: not calibrated before), if it was mended.
    /// Run on every upkeep tick.
    pub fn check_clock(&mut self) -> Result<Option<u64>> {
        if self.ebpf.program(prog_names::XDP_CLOCK).is_none()
            || self.clock_failed.is_some_and(|t| t.elapsed() < CLOCK_RETRY)
        {
            return Ok(None);
        }
        let gap = match self.clock {
            Some(f) => {
                let s = self.clock_sample()?;
                let gap = f.error_ns(s);
                if gap <= 2 * f.ns_per_jiffy {
                    return Ok(None);
                }
                gap
            }
            None => u64::MAX,
        };
        self.calibrate_clock()?;
        Ok(Some(gap))
    }

    pub fn set_config(&mut self, cfg: GlobalCfg) -> Result<()> {
        let mut a: Array<_, GlobalCfg> = Array::try_from(self.map_mut(mn::CONFIG)?)?;
        a.set(0, cfg, 0)?;
        Ok(())
    }

    pub fn config(&self) -> Result<GlobalCfg> {
        let a: Array<_, GlobalCfg> = Array::try_from(self.map(mn::CONFIG)?)?;
        Ok(a.get(&0, 0)?)
    }

    /// Let new sessions use the next hop cached per endpoint
    /// (`cfg_flags::EP_NH_CACHE`), or stop them. Returns whether it
    /// changed.
    pub fn set_ep_nh_cache(&mut self, on: bool) -> Result<bool> {
        let mut cfg = self.config()?;
        let was = cfg.flags & loxilb_common::cfg_flags::EP_NH_CACHE != 0;
        if was == on {
            return Ok(false);
        }
        cfg.flags ^= loxilb_common::cfg_flags::EP_NH_CACHE;
        self.set_config(cfg)?;
        Ok(true)
    }

    /// Check the node's routing ([`crate::netlink::routing_plain`]) and
    /// set `cfg_flags::EP_NH_CACHE` to match, logging a change.
    pub fn check_routing(&mut self) -> Result<()> {
        let why = crate::netlink::routing_plain()?;
        if self.set_ep_nh_cache(why.is_none())? {
            match why {
                None => tracing::info!("routing is plain: new sessions use the next hop kept per endpoint"),
                Some(w) => tracing::info!(
                    "{w}: every new session asks the FIB for its next hop (none is kept per endpoint)"
                ),
            }
        }
        Ok(())
    }

    /// Classify every device of this network namespace
    /// ([`crate::devices::classify`]) and write the result to
    /// `LB_DEV_FWD`, replacing what it held. Returns the devices and how
    /// translated packets leave through each.
    pub fn update_devices(&mut self) -> Result<Vec<(crate::netlink::Link, DevFwd)>> {
        let devs = crate::devices::survey()?;
        let m: StdHashMap<u32, DevFwd> = devs.iter().map(|(l, d)| (l.index, *d)).collect();
        self.set_dev_fwd(&m)?;
        Ok(devs)
    }

    /// Write `LB_DEV_FWD`: exactly `devs` (by ifindex).
    pub fn set_dev_fwd(&mut self, devs: &StdHashMap<u32, DevFwd>) -> Result<()> {
        let mut m: HashMap<_, u32, DevFwd> = HashMap::try_from(self.map_mut(mn::DEV_FWD)?)?;
        replace_dev_fwd(&mut m, devs)
    }

    /// Every program of the object with the instructions the verifier
    /// processed to accept it, by name (`None` where the kernel does not
    /// say, or the program has no info: not loaded; never left out).
    pub fn verified_insns(&self) -> Vec<(String, Option<u32>)> {
        let mut v: Vec<_> = self
            .ebpf
            .programs()
            .map(|(name, p)| {
                let n = p.info().ok().and_then(|i| i.verified_instruction_count());
                (name.to_string(), n)
            })
            .collect();
        v.sort();
        v
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn xdp_program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// The TC program, e.g. for BPF_PROG_TEST_RUN.
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(prog_names::TC_MAIN)
            .ok_or_else(|| anyhow!("program {} missing", prog_names::TC_MAIN))?
            .try_into()?)
    }

    fn link_pin(&self, iface: &str) -> Option<PathBuf> {
        self.pin_dir
            .as_ref()
            .map(|d| d.join("links").join(format!("xdp_{iface}")))
    }

    /// Attach the load balancer to `iface`'s XDP hook. If a previous agent
    /// left its program attached there (pinned link), it is replaced
    /// atomically: no packet sees a gap. Returns the mode used.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str> {
        self.attach_program(iface, mode, prog_names::XDP_MAIN)
    }

    /// Attach one of the object's XDP programs (`prog_names::*`) to `iface`.
    pub fn attach_program(
        &mut self,
        iface: &str,
        mode: AttachMode,
        program: &str,
    ) -> Result<&'static str> {
        let pin = if program == prog_names::XDP_MAIN {
            self.link_pin(iface)
        } else {
            None
        };
        let prog = self.xdp_program(program)?;
        if let Some(pin) = pin.filter(|p| p.exists()) {
            let fd_link: FdLink = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening the pinned XDP link {}", pin.display()))?
                .unpin()
                .with_context(|| format!("unpinning {}", pin.display()))?;
            let link = aya::programs::xdp::XdpLink::try_from(fd_link)?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("replacing the XDP program on {iface}"))?;
            self.attached.push(Attached {
                iface: iface.to_string(),
                id,
                program: prog_names::XDP_MAIN,
            });
            return Ok("adopted (program replaced in place)");
        }
        let (id, used) = match mode {
            AttachMode::Native => (prog.attach(iface, XdpMode::Driver), "native"),
            AttachMode::Generic => (prog.attach(iface, XdpMode::Skb), "generic"),
            AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => (Ok(id), "native"),
                Err(_) => (prog.attach(iface, XdpMode::Skb), "generic"),
            },
        };
        let id = id.with_context(|| {
            format!("attaching XDP ({used} mode) to {iface} failed; does the interface exist?")
        })?;
        self.attached.push(Attached {
            iface: iface.to_string(),
            id,
            program: prog_name_static(program),
        });
        Ok(used)
    }

    /// Attach the TC egress program (it translates ICMP errors the node's
    /// stack generates about translated packets) to `iface`; a link a
    /// previous agent left pinned is taken over in place.
    pub fn attach_egress(&mut self, iface: &str) -> Result<&'static str> {
        use aya::programs::tc::{SchedClassifierLink, TcAttachType};
        let pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join("links").join(format!("tc_egress_{iface}")));
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog_names::TC_EGRESS)
            .ok_or_else(|| anyhow!("program {} missing", prog_names::TC_EGRESS))?
            .try_into()?;
        if let Some(pin) = pin.filter(|p| p.exists()) {
            let fd_link: FdLink = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening the pinned TC link {}", pin.display()))?
                .unpin()?;
            let id = prog
                .attach_to_link(SchedClassifierLink::try_from(fd_link)?)
                .with_context(|| format!("replacing the TC egress program on {iface}"))?;
            self.egress.push((iface.to_string(), id));
            return Ok("adopted (program replaced in place)");
        }
        // clsact is needed for the netlink fallback (kernels before TCX).
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        let id = prog
            .attach(iface, TcAttachType::Egress)
            .with_context(|| format!("attaching TC egress to {iface}"))?;
        self.egress.push((iface.to_string(), id));
        Ok("attached")
    }

    /// Stop. With `keep`, the program stays attached (links pinned) and the
    /// maps stay pinned with their sessions, for the next agent to adopt.
    /// Without, everything is detached and unpinned.
    pub fn shutdown(mut self, keep: bool) -> Result<()> {
        let attached = std::mem::take(&mut self.attached);
        let egress = std::mem::take(&mut self.egress);
        if keep {
            let Some(dir) = self.pin_dir.clone() else {
                bail!("--keep needs a pin directory");
            };
            std::fs::create_dir_all(dir.join("links"))?;
            for (iface, id) in egress {
                let prog: &mut SchedClassifier = self
                    .ebpf
                    .program_mut(prog_names::TC_EGRESS)
                    .ok_or_else(|| anyhow!("program {} missing", prog_names::TC_EGRESS))?
                    .try_into()?;
                let link = prog.take_link(id)?;
                let pin = dir.join("links").join(format!("tc_egress_{iface}"));
                // A netlink (pre-TCX) attachment cannot be pinned: it goes
                // with us, and the next agent attaches afresh.
                if let Ok(l) = FdLink::try_from(link) {
                    l.pin(&pin)
                        .with_context(|| format!("pinning the TC link to {}", pin.display()))?;
                }
            }
            for a in attached {
                let pin = self.link_pin(&a.iface).expect("pin dir set");
                let prog = self.xdp_program(a.program)?;
                let link = prog.take_link(a.id)?;
                let fd_link: FdLink = link
                    .try_into()
                    .map_err(|e| anyhow!("the XDP link on {} cannot be pinned: {e:?}", a.iface))?;
                fd_link
                    .pin(&pin)
                    .with_context(|| format!("pinning the XDP link to {}", pin.display()))?;
            }
            return Ok(());
        }
        for a in attached {
            let prog = self.xdp_program(a.program)?;
            prog.detach(a.id)
                .with_context(|| format!("detaching from {}", a.iface))?;
        }
        for (iface, id) in egress {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog_names::TC_EGRESS)
                .ok_or_else(|| anyhow!("program {} missing", prog_names::TC_EGRESS))?
                .try_into()?;
            prog.detach(id)
                .with_context(|| format!("detaching TC egress from {iface}"))?;
        }
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir);
        }
        Ok(())
    }

    /// Rules currently in the maps (for adoption).
    pub fn read_installed(&self) -> Result<Vec<Installed>> {
        let svcs: HashMap<_, SvcKey, SvcVal> = HashMap::try_from(self.map(mn::SERVICES)?)?;
        let eps: HashMap<_, EpKey, EpVal> = HashMap::try_from(self.map(mn::ENDPOINTS)?)?;
        let ranges: LpmTrie<_, SrcRangeData, u32> = LpmTrie::try_from(self.map(mn::SRC_RANGES)?)?;
        let mut all_ranges: Vec<(u32, IpNet)> = vec![];
        for k in ranges.keys() {
            let k = k?;
            let d = k.data();
            let plen = k.prefix_len().saturating_sub(32);
            let net = match ip_from_addr(&d.addr) {
                std::net::IpAddr::V4(a) => IpNet::new(a.into(), plen.saturating_sub(96) as u8),
                a => IpNet::new(a, plen as u8),
            };
            if let Ok(net) = net {
                all_ranges.push((u32::from_be(d.rule_id_be), net));
            }
        }
        let rule_vips: HashMap<_, u32, RuleVips> = HashMap::try_from(self.map(mn::RULE_VIPS)?)?;
        // Service entries by rule: a multihomed SCTP rule has one per VIP.
        let mut by_rule: std::collections::BTreeMap<u32, Vec<(SvcKey, SvcVal)>> =
            Default::default();
        for kv in svcs.iter() {
            let (k, v) = kv?;
            by_rule.entry(v.rule_id).or_default().push((k, v));
        }
        let mut out = vec![];
        for (rule_id, mut entries) in by_rule {
            let listed: Vec<Addr> = match rule_vips.get(&rule_id, 0) {
                Ok(rv) => rv.vips[..(rv.n as usize).min(MAX_RULE_VIPS)].to_vec(),
                Err(_) => vec![],
            };
            let (k, v, secondary, consistent) = primary_and_secondaries(&mut entries, &listed);
            // The live bank's table run (the idle bank's chunks are free
            // space from now on).
            let live = v.ep_bank as usize & 1;
            let mut sel_base = [0u32; 2];
            let mut n_chunks = [0u32; 2];
            sel_base[live] = v.sel_base;
            n_chunks[live] = v.table_len.div_ceil(loxilb_common::SEL_CHUNK);
            let mut bank_len = [0u32; 2];
            for bank in 0..2u8 {
                let mut n = 0;
                while eps.get(&EpKey::new(v.rule_id, bank, n), 0).is_ok() {
                    n += 1;
                }
                bank_len[bank as usize] = n;
            }
            let list = (0..v.ep_count)
                .map(|i| eps.get(&EpKey::new(v.rule_id, v.ep_bank, i), 0))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("rule {} has missing endpoint entries", v.rule_id))?;
            out.push(Installed {
                name: format!(
                    "{}/{}",
                    std::net::SocketAddr::new(ip_from_addr(&k.addr), u16::from_be(k.port)),
                    loxilb_model::Protocol::from_number(k.proto)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| k.proto.to_string())
                ),
                key: k,
                secondary,
                // Entries that disagree (a change was interrupted): an
                // empty list differs from what any SCTP rule wants, so the
                // next apply rewrites them all.
                rule_vips: if consistent { listed } else { vec![] },
                rule_id: v.rule_id,
                bank: v.ep_bank,
                timeout_s: v.timeout_s,
                persist_timeout_s: v.persist_timeout_s,
                mode: v.mode,
                sel: v.sel,
                eps: list,
                bank_len,
                table_len: v.table_len,
                sel_base,
                chunks: n_chunks,
                src_ranges: all_ranges
                    .iter()
                    .filter(|(id, _)| *id == v.rule_id)
                    .map(|(_, n)| *n)
                    .collect(),
            });
        }
        Ok(out)
    }

    pub fn sessions(&self) -> Result<Vec<(CtKey, CtVal)>> {
        read_sessions(self.map(mn::CONNTRACK)?)
    }

    /// SCTP associations of multihomed rules, by (rule, verification tag).
    pub fn associations(&self) -> Result<Vec<(AssocKey, AssocVal)>> {
        read_lru(self.map(mn::SCTP_ASSOC)?)
    }

    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>> {
        read_stats(self.map(mn::STATS)?)
    }

    pub fn services(&self) -> Result<Vec<(SvcKey, SvcVal)>> {
        let svcs: HashMap<_, SvcKey, SvcVal> = HashMap::try_from(self.map(mn::SERVICES)?)?;
        Ok(svcs.iter().collect::<Result<Vec<_>, _>>()?)
    }

    pub fn endpoints(&self) -> Result<StdHashMap<EpKey, EpVal>> {
        let eps: HashMap<_, EpKey, EpVal> = HashMap::try_from(self.map(mn::ENDPOINTS)?)?;
        Ok(eps.iter().collect::<Result<_, _>>()?)
    }

    /// The next hop kept toward endpoint slot `idx` (`EpVal::stat_idx`).
    pub fn ep_nh(&self, idx: u32) -> Result<loxilb_common::EpNh> {
        let a: Array<_, loxilb_common::EpNh> = Array::try_from(self.map(mn::EP_NH)?)?;
        Ok(a.get(&idx, 0)?)
    }

    /// Write the next hop kept toward endpoint slot `idx` (tests).
    pub fn set_ep_nh(&mut self, idx: u32, nh: loxilb_common::EpNh) -> Result<()> {
        let mut a: Array<_, loxilb_common::EpNh> = Array::try_from(self.map_mut(mn::EP_NH)?)?;
        a.set(idx, nh, 0)?;
        Ok(())
    }

    /// The source kept toward endpoint slot `idx` (`EpVal::stat_idx`).
    pub fn ep_src(&self, idx: u32) -> Result<loxilb_common::EpSrc> {
        let a: Array<_, loxilb_common::EpSrc> = Array::try_from(self.map(mn::EP_SRC)?)?;
        Ok(a.get(&idx, 0)?)
    }

    /// Write the source kept toward endpoint slot `idx` (tests).
    pub fn set_ep_src(&mut self, idx: u32, v: loxilb_common::EpSrc) -> Result<()> {
        let mut a: Array<_, loxilb_common::EpSrc> = Array::try_from(self.map_mut(mn::EP_SRC)?)?;
        a.set(idx, v, 0)?;
        Ok(())
    }

    /// Every VIP of each SCTP rule, primary first, by rule id.
    pub fn rule_vips(&self) -> Result<StdHashMap<u32, RuleVips>> {
        let v: HashMap<_, u32, RuleVips> = HashMap::try_from(self.map(mn::RULE_VIPS)?)?;
        Ok(v.iter().collect::<Result<_, _>>()?)
    }

    /// Per-rule counters summed over CPUs, by rule id.
    pub fn rule_stats(&self) -> Result<StdHashMap<u32, RuleStats>> {
        read_rule_stats(self.map(mn::RULE_STATS)?)
    }

    /// Counters and active sessions of the endpoint counter slots `idx`.
    pub fn ep_stats(&self, idx: &[u32]) -> Result<Vec<(EpStats, u64)>> {
        read_ep_stats(self.map(mn::EP_STATS)?, self.map(mn::EP_ACTIVE)?, idx)
    }

    /// Remove the sessions that expired: both entries (the session's two
    /// directions) idle past their timeout by [`EXPIRY_GRACE_NS`], as of
    /// CLOCK_MONOTONIC `now_ns` (the datapath's clock). The datapath treats
    /// such entries as gone already, but for the short timeout of a session
    /// still opening (`ct_state::OPENING`, see [`session_timeout_s`]),
    /// which only this applies; without this they stay in the table until
    /// the LRU needs their room. Returns (removed, the live ones).
    pub fn expire_idle(&mut self, now_ns: u64) -> Result<(usize, Vec<(CtKey, CtVal)>)> {
        let all = self.sessions()?;
        // Each entry by key, borrowed (not a second copy of the values: the
        // table holds up to MAX_CT_ENTRIES of them).
        let by_key: StdHashMap<CtKey, &CtVal> = all.iter().map(|(k, v)| (*k, v)).collect();
        let idle = |k: &CtKey, v: &CtVal| {
            let timeout_s = session_timeout_s(k, v, |f| by_key.get(f).copied());
            now_ns.saturating_sub(v.last_seen_ns)
                > timeout_s as u64 * 1_000_000_000 + EXPIRY_GRACE_NS
        };
        let over: Vec<bool> = all
            .iter()
            .map(|(k, v)| {
                idle(k, v)
                    && k.peer(v)
                        .and_then(|p| by_key.get(&p).map(|pv| idle(&p, pv)))
                        .unwrap_or(true)
            })
            .collect();
        drop(by_key);
        let (gone, live): (Vec<_>, Vec<_>) = all.into_iter().zip(over).partition(|(_, over)| *over);
        let live: Vec<(CtKey, CtVal)> = live.into_iter().map(|(e, _)| e).collect();
        let mut ct: HashMap<_, CtKey, CtVal> = HashMap::try_from(self.map_mut(mn::CONNTRACK)?)?;
        let mut removed = 0;
        for ((k, _), _) in &gone {
            // A key a packet removed or renewed meanwhile: fine either way.
            if ct.remove(k).is_ok() {
                removed += 1;
            }
        }
        Ok((removed, live))
    }

    /// Re-count active sessions per endpoint from conntrack and write the
    /// counts (corrects the drift left by sessions the LRU evicted).
    /// Returns how many endpoint slots changed.
    pub fn recount_active(&mut self) -> Result<usize> {
        let s = self.sessions()?;
        self.recount_active_from(&s)
    }

    /// [`Datapath::recount_active`] from a walk of the table already made.
    pub fn recount_active_from(&mut self, sessions: &[(CtKey, CtVal)]) -> Result<usize> {
        let mut counts: StdHashMap<u32, u64> = StdHashMap::new();
        for (_, v) in sessions {
            if v.dir == loxilb_common::ct_dir::FORWARD
                && v.state & loxilb_common::ct_state::RELEASED == 0
            {
                *counts.entry(v.ep_stat).or_default() += 1;
            }
        }
        let slots: Vec<u32> = self
            .endpoints()?
            .values()
            .map(|e| e.stat_idx)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut a: Array<_, u64> = Array::try_from(self.map_mut(mn::EP_ACTIVE)?)?;
        let mut changed = 0;
        for i in slots {
            let want = counts.get(&i).copied().unwrap_or(0);
            if a.get(&i, 0)? != want {
                a.set(i, want, 0)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Set an endpoint's flags (e.g. `ep_flags::INACTIVE`) in place, in
    /// its rule's bank and in its slot.
    pub fn set_endpoint_flags(&mut self, key: EpKey, flags: u32) -> Result<()> {
        let mut m: HashMap<_, EpKey, EpVal> = HashMap::try_from(self.map_mut(mn::ENDPOINTS)?)?;
        let mut v = m
            .get(&key, 0)
            .with_context(|| format!("no endpoint {key:?}"))?;
        v.flags = flags;
        m.insert(key, v, 0)?;
        self.put_ep_slot(v.stat_idx, v)
    }

    /// Write endpoint slot `idx` of `LB_EP_SLOTS` (what the selection
    /// table's entries point at).
    fn put_ep_slot(&mut self, idx: u32, val: EpVal) -> Result<()> {
        array_put(self, mn::EP_SLOTS, idx, val)
    }

    /// Whether the address filter lets packets from or to `a` through to
    /// the session table (its bit, which other addresses may share, is
    /// set).
    pub fn filter_passes(&self, a: Addr) -> Result<bool> {
        let (w, b) = loxilb_common::addr_filter_bit(loxilb_common::addr_fold(&a));
        let f: Array<_, u64> = Array::try_from(self.map(mn::ADDR_FILTER)?)?;
        Ok(f.get(&w, 0)? & (1 << b) != 0)
    }

    pub fn clear_sessions(&mut self) -> Result<usize> {
        let mut ct: HashMap<_, CtKey, CtVal> = HashMap::try_from(self.map_mut(mn::CONNTRACK)?)?;
        let keys: Vec<CtKey> = ct.keys().collect::<Result<_, _>>()?;
        for k in &keys {
            let _ = ct.remove(k);
        }
        Ok(keys.len())
    }

    pub fn insert_session(&mut self, k: CtKey, v: CtVal) -> Result<()> {
        let mut ct: HashMap<_, CtKey, CtVal> = HashMap::try_from(self.map_mut(mn::CONNTRACK)?)?;
        ct.insert(k, v, 0)?;
        Ok(())
    }

    /// The endpoint index's non-empty slots (see `ep_index`).
    pub fn ep_index(&self) -> Result<Vec<(u32, EpIndex)>> {
        let a: Array<_, EpIndex> = Array::try_from(self.map(mn::EP_INDEX)?)?;
        let mut v = vec![];
        for (i, e) in a.iter().enumerate() {
            let e = e?;
            if e.proto != 0 {
                v.push((i as u32, e));
            }
        }
        Ok(v)
    }
}

/// Of the service entries of one rule: the primary one (the first of the
/// rule's VIP list `listed` when it has one, else the lowest), the
/// secondary VIPs (in the list's order, then any other entry of the rule
/// left by an interrupted change, so that the next change removes it),
/// and whether every entry holds the primary's value.
pub(crate) fn primary_and_secondaries(
    entries: &mut [(SvcKey, SvcVal)],
    listed: &[Addr],
) -> (SvcKey, SvcVal, Vec<Addr>, bool) {
    entries.sort_by_key(|(k, _)| (ip_from_addr(&k.addr), u16::from_be(k.port), k.proto));
    let pi = listed
        .first()
        .and_then(|p| entries.iter().position(|(k, _)| k.addr == *p))
        .unwrap_or(0);
    let (k, v) = entries[pi];
    let same_service = |e: &SvcKey| e.port == k.port && e.proto == k.proto && e.addr != k.addr;
    let mut secondary: Vec<Addr> = listed
        .iter()
        .skip(1)
        .filter(|a| {
            entries
                .iter()
                .any(|(e, _)| same_service(e) && e.addr == **a)
        })
        .copied()
        .collect();
    for (e, _) in entries.iter() {
        if same_service(e) && !secondary.contains(&e.addr) {
            secondary.push(e.addr);
        }
    }
    let consistent = entries
        .iter()
        .all(|(_, x)| SvcVal { rr_next: 0, ..*x } == SvcVal { rr_next: 0, ..v });
    (k, v, secondary, consistent)
}

fn prog_name_static(p: &str) -> &'static str {
    [
        prog_names::XDP_MAIN,
        prog_names::XDP_PASS,
        prog_names::XDP_DECAP,
    ]
    .into_iter()
    .find(|n| *n == p)
    .unwrap_or(prog_names::XDP_MAIN)
}

/// The LPM key of a source range: the rule id, then the prefix (an IPv4
/// prefix as its IPv4-mapped form, 96 bits longer).
fn src_range_key(rule_id: u32, net: IpNet) -> LpmKey<SrcRangeData> {
    let mapped = if net.addr().is_ipv4() { 96 } else { 0 };
    LpmKey::new(
        32 + mapped + net.prefix_len() as u32,
        SrcRangeData {
            rule_id_be: rule_id.to_be(),
            addr: addr_from_ip(net.network()),
        },
    )
}

fn check_pinned_layout(dir: &Path) -> Result<()> {
    let data = MapData::from_pin(dir.join(mn::CONFIG))
        .with_context(|| format!("opening {}", dir.join(mn::CONFIG).display()))?;
    let map = Map::Array(data);
    let a: Array<_, GlobalCfg> = Array::try_from(&map).map_err(|e| {
        anyhow!(
            "the maps pinned in {} do not match this agent's layout ({e}); remove them \
             (`rm -r {}`) to start fresh",
            dir.display(),
            dir.display()
        )
    })?;
    let cfg = a.get(&0, 0)?;
    if cfg.layout_version != LAYOUT_VERSION {
        bail!(
            "the maps pinned in {} have layout version {}, this agent uses {}; they cannot be \
             adopted. Remove them (`rm -r {}`) to start fresh (open sessions will be lost)",
            dir.display(),
            cfg.layout_version,
            LAYOUT_VERSION,
            dir.display()
        );
    }
    Ok(())
}

fn read_sessions(m: &Map) -> Result<Vec<(CtKey, CtVal)>> {
    read_lru(m)
}

/// Every entry of an LRU hash map (entries can vanish during the walk:
/// those are skipped).
fn read_lru<K: aya::Pod, V: aya::Pod>(m: &Map) -> Result<Vec<(K, V)>> {
    let ct: HashMap<_, K, V> = HashMap::try_from(m)?;
    let mut v = vec![];
    for kv in ct.iter() {
        match kv {
            Ok(kv) => v.push(kv),
            // LRU entries can vanish while we walk: skip them.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(v)
}

fn read_ep_stats(stats: &Map, active: &Map, idx: &[u32]) -> Result<Vec<(EpStats, u64)>> {
    let s: PerCpuArray<_, EpStats> = PerCpuArray::try_from(stats)?;
    let a: Array<_, u64> = Array::try_from(active)?;
    let mut out = vec![];
    for i in idx {
        let mut sum = EpStats::default();
        for c in s.get(i, 0)?.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.new_sessions += c.new_sessions;
        }
        out.push((sum, a.get(i, 0)?));
    }
    Ok(out)
}

fn read_rule_stats(m: &Map) -> Result<StdHashMap<u32, RuleStats>> {
    let a: PerCpuArray<_, RuleStats> = PerCpuArray::try_from(m)?;
    let mut out = StdHashMap::new();
    for id in 1..=loxilb_common::MAX_SERVICES {
        let per_cpu = a.get(&id, 0)?;
        let mut sum = RuleStats::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.new_sessions += c.new_sessions;
            sum.drop_no_endpoint += c.drop_no_endpoint;
            sum.drop_src_range += c.drop_src_range;
        }
        if sum != RuleStats::default() {
            out.insert(id, sum);
        }
    }
    Ok(out)
}

fn read_stats(m: &Map) -> Result<Vec<(&'static str, u64)>> {
    let a: PerCpuArray<_, u64> = PerCpuArray::try_from(m)?;
    let mut out = vec![];
    for i in 0..stat::COUNT {
        let name = loxilb_common::STAT_NAMES[i as usize];
        if name.is_empty() {
            continue;
        }
        let per_cpu = a.get(&i, 0)?;
        out.push((name, per_cpu.iter().sum()));
    }
    Ok(out)
}

fn replace_dev_fwd<T: std::borrow::BorrowMut<MapData>>(
    m: &mut HashMap<T, u32, DevFwd>,
    devs: &StdHashMap<u32, DevFwd>,
) -> Result<()> {
    let stale: Vec<u32> = m
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !devs.contains_key(k))
        .collect();
    for k in stale {
        let _ = m.remove(&k);
    }
    for (k, v) in devs {
        m.insert(k, v, 0)
            .with_context(|| format!("writing the {} map", mn::DEV_FWD))?;
    }
    Ok(())
}

/// [`Datapath::set_dev_fwd`] on the map pinned at `path` (the agent's
/// device watcher, on its own thread).
pub fn write_dev_fwd_pinned(path: &Path, devs: &StdHashMap<u32, DevFwd>) -> Result<()> {
    let d = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let mut m: HashMap<_, u32, DevFwd> = HashMap::try_from(Map::HashMap(d))?;
    replace_dev_fwd(&mut m, devs)
}

/// Remove what a datapath pinned in `dir`: every map, and every link (a
/// program an earlier `--keep` run left attached is detached with its
/// link). Returns how many links were detached.
pub fn remove_pins(dir: &Path) -> usize {
    for n in mn::ALL {
        let _ = std::fs::remove_file(dir.join(n));
    }
    let mut links = 0;
    if let Ok(rd) = std::fs::read_dir(dir.join("links")) {
        for e in rd.flatten() {
            if let Ok(l) = PinnedLink::from_pin(e.path()) {
                if l.unpin().is_ok() {
                    links += 1;
                }
            }
        }
    }
    let _ = std::fs::remove_dir(dir.join("links"));
    let _ = std::fs::remove_dir(dir);
    links
}

/// Read-only access to a running agent's pinned maps (for the CLI).
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join(mn::CONNTRACK).exists() {
            bail!(
                "no datapath maps are pinned in {}; is the agent running (and with this --pin-dir)?",
                dir.display()
            );
        }
        check_pinned_layout(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn open_map(&self, name: &str, wrap: fn(MapData) -> Map) -> Result<Map> {
        let d = MapData::from_pin(self.dir.join(name))
            .with_context(|| format!("opening {}", self.dir.join(name).display()))?;
        Ok(wrap(d))
    }

    pub fn sessions(&self) -> Result<Vec<(CtKey, CtVal)>> {
        read_sessions(&self.open_map(mn::CONNTRACK, Map::LruHashMap)?)
    }

    /// SCTP associations of multihomed rules, by (rule, verification tag).
    pub fn associations(&self) -> Result<Vec<(AssocKey, AssocVal)>> {
        read_lru(&self.open_map(mn::SCTP_ASSOC, Map::LruHashMap)?)
    }

    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>> {
        read_stats(&self.open_map(mn::STATS, Map::PerCpuArray)?)
    }

    pub fn rule_stats(&self) -> Result<StdHashMap<u32, RuleStats>> {
        read_rule_stats(&self.open_map(mn::RULE_STATS, Map::PerCpuArray)?)
    }

    pub fn ep_stats(&self, idx: &[u32]) -> Result<Vec<(EpStats, u64)>> {
        read_ep_stats(
            &self.open_map(mn::EP_STATS, Map::PerCpuArray)?,
            &self.open_map(mn::EP_ACTIVE, Map::Array)?,
            idx,
        )
    }

    pub fn services(&self) -> Result<Vec<(SvcKey, SvcVal)>> {
        let m = self.open_map(mn::SERVICES, Map::HashMap)?;
        let svcs: HashMap<_, SvcKey, SvcVal> = HashMap::try_from(&m)?;
        Ok(svcs.iter().collect::<Result<Vec<_>, _>>()?)
    }

    pub fn endpoints(&self) -> Result<StdHashMap<EpKey, EpVal>> {
        let m = self.open_map(mn::ENDPOINTS, Map::HashMap)?;
        let eps: HashMap<_, EpKey, EpVal> = HashMap::try_from(&m)?;
        Ok(eps.iter().collect::<Result<_, _>>()?)
    }

    /// The datapath's global configuration.
    pub fn config(&self) -> Result<GlobalCfg> {
        let m = self.open_map(mn::CONFIG, Map::Array)?;
        let a: Array<_, GlobalCfg> = Array::try_from(&m)?;
        Ok(a.get(&0, 0)?)
    }

    /// How translated packets leave through each device, by ifindex.
    pub fn dev_fwd(&self) -> Result<Vec<(u32, DevFwd)>> {
        let m = self.open_map(mn::DEV_FWD, Map::HashMap)?;
        let v: HashMap<_, u32, DevFwd> = HashMap::try_from(&m)?;
        let mut out: Vec<(u32, DevFwd)> = v.iter().collect::<Result<_, _>>()?;
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Every VIP of each SCTP rule, primary first, by rule id.
    pub fn rule_vips(&self) -> Result<StdHashMap<u32, RuleVips>> {
        let m = self.open_map(mn::RULE_VIPS, Map::HashMap)?;
        let v: HashMap<_, u32, RuleVips> = HashMap::try_from(&m)?;
        Ok(v.iter().collect::<Result<_, _>>()?)
    }
}

/// Insert into a hash map of the datapath, naming the map on failure.
fn hash_put<K: aya::Pod, V: aya::Pod>(dp: &mut Datapath, map: &str, k: K, v: V) -> Result<()> {
    let mut m: HashMap<_, K, V> = HashMap::try_from(dp.map_mut(map)?)?;
    m.insert(k, v, 0)
        .with_context(|| format!("writing the {map} map"))?;
    Ok(())
}

/// Write element `i` of an array map of the datapath, naming the map on
/// failure.
fn array_put<V: aya::Pod>(dp: &mut Datapath, map: &str, i: u32, v: V) -> Result<()> {
    let mut a: Array<_, V> = Array::try_from(dp.map_mut(map)?)?;
    a.set(i, v, 0)
        .with_context(|| format!("writing element {i} of the {map} map"))?;
    Ok(())
}

/// Remove from a hash map of the datapath; a missing key is fine.
fn hash_del<K: aya::Pod, V: aya::Pod>(dp: &mut Datapath, map: &str, k: K) -> Result<()> {
    let mut m: HashMap<_, K, V> = HashMap::try_from(dp.map_mut(map)?)?;
    match m.remove(&k) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting from the {map} map")),
    }
}

impl RuleTable for Datapath {
    fn put_service(&mut self, key: SvcKey, val: SvcVal) -> Result<()> {
        hash_put(self, mn::SERVICES, key, val)
    }
    fn delete_service(&mut self, key: SvcKey) -> Result<()> {
        hash_del::<SvcKey, SvcVal>(self, mn::SERVICES, key)
    }
    fn put_endpoint(&mut self, key: EpKey, val: EpVal) -> Result<()> {
        hash_put(self, mn::ENDPOINTS, key, val)?;
        self.put_ep_slot(val.stat_idx, val)
    }
    fn delete_endpoint(&mut self, key: EpKey) -> Result<()> {
        hash_del::<EpKey, EpVal>(self, mn::ENDPOINTS, key)
    }
    fn put_sel_chunk(&mut self, index: u32, val: SelChunk) -> Result<()> {
        array_put(self, mn::SEL_TABLE, index, val)
    }
    fn delete_sel_chunk(&mut self, index: u32) -> Result<()> {
        self.put_sel_chunk(index, SelChunk::default())
    }
    fn put_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()> {
        let mut m: LpmTrie<_, SrcRangeData, u32> =
            LpmTrie::try_from(self.map_mut(mn::SRC_RANGES)?)?;
        m.insert(&src_range_key(rule_id, net), 1, 0)
            .context("writing the source-range map")?;
        Ok(())
    }
    fn delete_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()> {
        let mut m: LpmTrie<_, SrcRangeData, u32> =
            LpmTrie::try_from(self.map_mut(mn::SRC_RANGES)?)?;
        match m.remove(&src_range_key(rule_id, net)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn reset_ep_stats(&mut self, idx: u32) -> Result<()> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        {
            let mut a: PerCpuArray<_, EpStats> =
                PerCpuArray::try_from(self.map_mut(mn::EP_STATS)?)?;
            a.set(idx, PerCpuValues::try_from(vec![EpStats::default(); n])?, 0)?;
        }
        let mut a: Array<_, u64> = Array::try_from(self.map_mut(mn::EP_ACTIVE)?)?;
        a.set(idx, 0, 0)?;
        Ok(())
    }
    fn retire_ep_slot(&mut self, idx: u32) -> Result<()> {
        self.put_ep_slot(idx, crate::rules::RETIRED_EP)
    }
    fn put_ep_index(&mut self, slot: u32, e: EpIndex) -> Result<()> {
        array_put(self, mn::EP_INDEX, slot, e)
    }
    fn reset_rule_stats(&mut self, rule_id: u32) -> Result<()> {
        let mut a: PerCpuArray<_, RuleStats> =
            PerCpuArray::try_from(self.map_mut(mn::RULE_STATS)?)?;
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        a.set(
            rule_id,
            PerCpuValues::try_from(vec![RuleStats::default(); n])?,
            0,
        )?;
        Ok(())
    }
    fn put_vip(&mut self, vip: Addr) -> Result<()> {
        hash_put(self, mn::VIPS, vip, 1u32)
    }
    fn delete_vip(&mut self, vip: Addr) -> Result<()> {
        hash_del::<Addr, u32>(self, mn::VIPS, vip)
    }
    fn put_rule_vips(&mut self, rule_id: u32, vips: RuleVips) -> Result<()> {
        hash_put(self, mn::RULE_VIPS, rule_id, vips)
    }
    fn delete_rule_vips(&mut self, rule_id: u32) -> Result<()> {
        hash_del::<u32, RuleVips>(self, mn::RULE_VIPS, rule_id)
    }
    fn put_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
        let mut a: Array<_, u64> = Array::try_from(self.map_mut(mn::ADDR_FILTER)?)?;
        a.set(index, word, 0)?;
        Ok(())
    }
    fn flush_sessions(&mut self, rule_id: u32) -> Result<usize> {
        {
            let mut aff: HashMap<_, AffKey, AffVal> =
                HashMap::try_from(self.map_mut(mn::AFFINITY)?)?;
            let doomed: Vec<AffKey> = aff
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.rule_id == rule_id)
                .collect();
            for k in &doomed {
                let _ = aff.remove(k);
            }
        }
        let mut ct: HashMap<_, CtKey, CtVal> = HashMap::try_from(self.map_mut(mn::CONNTRACK)?)?;
        let doomed: Vec<CtKey> = ct
            .iter()
            .filter_map(|kv| kv.ok())
            .filter(|(_, v)| v.rule_id == rule_id)
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            let _ = ct.remove(k);
        }
        Ok(doomed.len())
    }
}

/// Load (have the kernel verify) the programs `names` of `ebpf`, on as
/// many threads as there are CPUs: the kernel verifies a privileged
/// loader's programs in parallel, and verifying is most of the time it
/// takes to load the datapath (several seconds; see README *Performance*).
/// The programs that verify most instructions (the IPv6 ones) go first, so
/// that no thread is left with a long one at the end. Every program is
/// tried; the first refusal is the error.
fn load_in_parallel(ebpf: &mut Ebpf, names: &[&str]) -> Result<()> {
    use aya::programs::Program;
    let mut todo: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(n, _)| names.contains(n))
        .collect();
    if let Some(missing) = names.iter().find(|n| !todo.iter().any(|(t, _)| t == *n)) {
        bail!("program {missing} missing from the eBPF object");
    }
    // Popped from the end: the IPv6 programs last in the vector.
    todo.sort_by_key(|(n, _)| (n.ends_with('6'), *n));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(todo.len())
        .max(1);
    let queue = std::sync::Mutex::new(todo);
    let load = |name: &str, p: &mut Program| -> Result<()> {
        match p {
            Program::Xdp(x) => x.load(),
            Program::SchedClassifier(t) => t.load(),
            _ => bail!("program {name} is neither XDP nor TC"),
        }
        .with_context(|| format!("the kernel verifier rejected {name}"))
    };
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut first_err = Ok(());
                    loop {
                        let next = queue
                            .lock()
                            .map_err(|_| anyhow!("a loader thread panicked"))?
                            .pop();
                        let Some((name, p)) = next else {
                            return first_err;
                        };
                        if let Err(e) = load(name, p) {
                            if first_err.is_ok() {
                                first_err = Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow!("a loader thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// The idle timeout entry `k` -> `v` lives by, seconds: its session's.
/// A session is opening (`ct_state::OPENING`: at most
/// `CT_OPENING_TIMEOUT_S`) while its forward entry says so: the datapath
/// clears the bit there when the client acknowledges and leaves the reply
/// entry's as it was created (one write fewer, and none on the reply
/// path), so a reply entry goes by the state of its forward entry, which
/// `forward` finds by key, when there is one.
pub fn session_timeout_s<'a>(
    k: &CtKey,
    v: &CtVal,
    forward: impl Fn(&CtKey) -> Option<&'a CtVal>,
) -> u32 {
    use loxilb_common::{ct_dir, ct_state, idle_timeout_s};
    if v.dir == ct_dir::REPLY && v.state & ct_state::OPENING != 0 {
        if let Some(f) = k.peer(v).and_then(|p| forward(&p)) {
            return idle_timeout_s(v.timeout_s, f.state);
        }
    }
    v.idle_timeout_s()
}

/// [`session_timeout_s`] of each entry of `sessions`, in order.
pub fn session_timeouts_s(sessions: &[(CtKey, CtVal)]) -> Vec<u32> {
    let by_key: StdHashMap<CtKey, &CtVal> = sessions.iter().map(|(k, v)| (*k, v)).collect();
    sessions
        .iter()
        .map(|(k, v)| session_timeout_s(k, v, |f| by_key.get(f).copied()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use loxilb_common::{ct_dir, ct_state::OPENING, CT_OPENING_TIMEOUT_S};

    #[test]
    fn a_reply_entry_goes_by_its_forward_entrys_handshake() {
        let a = |last: u8| addr_from_ip(std::net::Ipv4Addr::new(10, 0, 0, last).into());
        // Client 10.0.0.1:1000 -> VIP 10.0.0.100:80, DNAT to 10.0.0.7:8080.
        let fwd = |port: u16, state| {
            let k = CtKey {
                saddr: a(1),
                daddr: a(100),
                sport: port.to_be(),
                dport: 80u16.to_be(),
                proto: 6,
                ..Default::default()
            };
            let v = CtVal {
                xsaddr: a(1),
                xdaddr: a(7),
                xsport: port.to_be(),
                xdport: 8080u16.to_be(),
                timeout_s: 1800,
                dir: ct_dir::FORWARD,
                state,
                ..Default::default()
            };
            (k, v)
        };
        let reply = |(k, v): (CtKey, CtVal), state| {
            let rk = k.peer(&v).unwrap();
            let rv = CtVal {
                xsaddr: k.daddr,
                xdaddr: k.saddr,
                xsport: k.dport,
                xdport: k.sport,
                timeout_s: 1800,
                dir: ct_dir::REPLY,
                state,
                ..Default::default()
            };
            assert_eq!(rk.peer(&rv), Some(k));
            (rk, rv)
        };
        let (f1, f2) = (fwd(1000, OPENING), fwd(1001, 0));
        let s = vec![
            f1,
            reply(f1, OPENING),
            // The client acknowledged: the reply entry kept its bit.
            f2,
            reply(f2, OPENING),
            // A reply entry without its forward entry goes by its own.
            reply(fwd(1002, 0), OPENING),
            reply(fwd(1003, 0), 0),
        ];
        let o = CT_OPENING_TIMEOUT_S;
        assert_eq!(session_timeouts_s(&s), vec![o, o, 1800, 1800, o, 1800]);
        assert_eq!(session_timeouts_s(&s[..2]), vec![o, o]);
        assert_eq!(session_timeouts_s(&[]), Vec::<u32>::new());
    }
}
