//! An owner thread: one dedicated OS thread owns a value (the agent's
//! [`Node`](crate::node::Node)) and is the only code that touches it;
//! everything else sends it jobs over a channel and gets the results back.
//!
//! Why: the node's work blocks. Its periodic upkeep walks the whole
//! conntrack map and talks to BIRD over its control socket; applying rules
//! writes BPF maps and may read the routing table. Behind a shared
//! `std::sync::Mutex` used from Tokio tasks, that work ran on the
//! runtime's worker threads, and every other task wanting the node blocked
//! a worker on the lock meanwhile. With an owner thread there is no shared
//! lock at all, the jobs run one at a time in the order sent (what the
//! mutex gave; the upkeep and the probe results are jobs too, sent by the
//! agent's timer and the prober's channel), and an async caller awaits
//! its reply ([`Handle::call`]) without holding up a
//! worker. The callers that are synchronous trait methods (the REST API's,
//! the Kubernetes controller's sinks) wait with [`Handle::call_blocking`],
//! which on a multi-thread runtime hands the worker's other tasks to
//! another thread first (`block_in_place`).
//!
//! The thread enters the Tokio runtime it was started from, so code of
//! the owned value that expects a current runtime (spawning a task) works
//! as it did on the runtime's threads. A panic on the owner thread ends
//! the process with status 101, as a panic of the daemon's main task does
//! (before this thread existed, such a panic there, or a poisoned lock,
//! did the same).

use std::{sync::mpsc, thread::JoinHandle};

use tracing::error;

type Job<T> = Box<dyn FnOnce(&mut T) + Send>;

enum Msg<T> {
    Run(Job<T>),
    Stop,
}

/// The value is gone: the owner stopped (the agent is stopping), or was
/// never started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the agent is stopping")
    }
}

impl std::error::Error for Gone {}

/// A way to the owned value, for any number of callers (cheap to clone).
pub struct Handle<T> {
    tx: mpsc::Sender<Msg<T>>,
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        Handle {
            tx: self.tx.clone(),
        }
    }
}

/// The receiving end, before the owner thread is started: jobs sent to a
/// [`Handle`] in the meantime wait in the queue.
pub struct Inbox<T> {
    tx: mpsc::Sender<Msg<T>>,
    rx: mpsc::Receiver<Msg<T>>,
}

/// A handle and the inbox it sends to; start the thread with
/// [`Inbox::spawn`] once the value exists.
pub fn channel<T>() -> (Handle<T>, Inbox<T>) {
    let (tx, rx) = mpsc::channel();
    (Handle { tx: tx.clone() }, Inbox { tx, rx })
}

impl<T: 'static> Handle<T> {
    /// Queue `f` without waiting for it (fire and forget).
    pub fn send(&self, f: impl FnOnce(&mut T) + Send + 'static) -> Result<(), Gone> {
        self.tx.send(Msg::Run(Box::new(f))).map_err(|_| Gone)
    }

    /// Run `f` on the owner thread and await its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut T) -> R + Send + 'static,
    ) -> Result<R, Gone> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(move |v| {
            let _ = reply.send(f(v));
        })?;
        // An error: the job was dropped unrun (the owner stopped first).
        rx.await.map_err(|_| Gone)
    }

    /// Run `f` on the owner thread and wait for its result, blocking this
    /// thread. On a multi-thread Tokio runtime's worker the wait is in
    /// `block_in_place` (the worker's other tasks move to another
    /// thread); on a current-thread runtime it blocks the runtime, as the
    /// work itself did when it ran there.
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut T) -> R + Send + 'static,
    ) -> Result<R, Gone> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(move |v| {
            let _ = reply.send(f(v));
        })?;
        let wait = || rx.recv().map_err(|_| Gone);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }
}

/// The running owner thread; [`Owner::stop`] ends it and gives the value
/// back. Dropped without `stop` (an early error return), it stops the
/// thread the same way and drops the value, so the value's own cleanup
/// (the BGP speaker's, say) has run when the drop returns.
pub struct Owner<T> {
    tx: mpsc::Sender<Msg<T>>,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Inbox<T> {
    /// Start the OS thread `name` owning `value`: it runs the jobs sent,
    /// one at a time, in the order sent.
    pub fn spawn(self, name: &str, value: T) -> std::io::Result<Owner<T>> {
        // The owner keeps a sender: the thread runs until stopped, however
        // many handles are left.
        let Inbox { tx, rx } = self;
        let rt = tokio::runtime::Handle::try_current().ok();
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _rt = rt.as_ref().map(|h| h.enter());
                let run = std::panic::AssertUnwindSafe(|| serve(value, &rx));
                match std::panic::catch_unwind(run) {
                    Ok(v) => v,
                    Err(_) => {
                        // The panic message went to stderr (panic hook).
                        error!("the {label} thread panicked; exiting");
                        std::process::exit(101)
                    }
                }
            })?;
        Ok(Owner {
            tx,
            thread: Some(thread),
        })
    }
}

fn serve<T>(mut value: T, rx: &mpsc::Receiver<Msg<T>>) -> T {
    for msg in rx {
        match msg {
            Msg::Run(job) => job(&mut value),
            Msg::Stop => break,
        }
    }
    value
}

impl<T> Owner<T> {
    /// Stop the thread once the jobs queued before have run, and take the
    /// value back. Jobs sent after are dropped unrun: their callers get
    /// [`Gone`].
    pub fn stop(mut self) -> T {
        self.end().expect("stopped once")
    }

    fn end(&mut self) -> Option<T> {
        let thread = self.thread.take()?;
        let _ = self.tx.send(Msg::Stop);
        // A panic there ends the process (see the module docs), so the
        // thread returns the value.
        Some(thread.join().expect("the owner thread returns its value"))
    }
}

impl<T> Drop for Owner<T> {
    fn drop(&mut self) {
        drop(self.end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    #[derive(Default)]
    struct Log {
        seen: Vec<u32>,
        thread: Option<String>,
    }

    #[test]
    fn jobs_run_in_order_on_the_named_thread_and_stop_gives_the_value_back() {
        let (h, inbox) = channel::<Log>();
        // Sent before the thread starts: queued.
        h.send(|l| l.seen.push(1)).unwrap();
        let owner = inbox.spawn("test-owner", Log::default()).unwrap();
        h.send(|l| l.seen.push(2)).unwrap();
        let n = h
            .call_blocking(|l| {
                l.thread = std::thread::current().name().map(str::to_string);
                l.seen.push(3);
                l.seen.len()
            })
            .unwrap();
        assert_eq!(n, 3);
        let l = owner.stop();
        assert_eq!(l.seen, [1, 2, 3]);
        assert_eq!(l.thread.as_deref(), Some("test-owner"));
        // Stopped: callers are told.
        assert_eq!(h.send(|_| {}), Err(Gone));
        assert_eq!(h.call_blocking(|_| ()), Err(Gone));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_and_blocking_calls_from_a_multi_thread_runtime() {
        let (h, inbox) = channel::<Log>();
        let owner = inbox.spawn("test-owner", Log::default()).unwrap();
        h.send(|l| l.seen.push(7)).unwrap();
        assert_eq!(h.call(|l| l.seen.clone()).await, Ok(vec![7]));
        let h2 = h.clone();
        // A synchronous caller on a worker (block_in_place).
        let n = tokio::spawn(async move { h2.call_blocking(|l| l.seen.len()) })
            .await
            .unwrap();
        assert_eq!(n, Ok(1));
        drop(owner.stop());
        assert_eq!(h.call(|_| ()).await, Err(Gone));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_call_on_a_current_thread_runtime() {
        let (h, inbox) = channel::<Log>();
        let _owner = inbox.spawn("test-owner", Log::default()).unwrap();
        // The owner thread sees the runtime it was started from.
        let seen = h.call_blocking(|_| tokio::runtime::Handle::try_current().is_ok());
        assert_eq!(seen, Ok(true));
    }

    #[test]
    fn dropping_the_owner_stops_the_thread_and_drops_the_value() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let (h, inbox) = channel::<Flag>();
        let owner = inbox.spawn("test-owner", Flag(dropped.clone())).unwrap();
        let _kept = h.clone();
        drop(owner);
        assert!(
            dropped.load(Ordering::SeqCst),
            "dropped by the time drop returns"
        );
        assert_eq!(h.call_blocking(|_| ()), Err(Gone));
    }
}
