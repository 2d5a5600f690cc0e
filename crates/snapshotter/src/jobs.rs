//! Work a request leaves for after its answer: the queue the server's
//! worker drains ([`crate::server`]), one job at a time under the same
//! mutex as the requests, once requests pause
//! ([`crate::ops::SnapshotOps::work`]).
//!
//! A Commit needs only its record rewritten before the answer; the
//! snapshot's holder mount, its measure and its device wait ([`Job::Settle`]).
//! A Remove needs only its record gone; the holder mount and the layer
//! wait ([`Job::Remove`]). Jobs run in the order they were queued (a child's
//! removal before its parent's). A request about to use a layer with jobs
//! queued runs them first ([`Queue::take_through`]): a snapshot of a parent
//! needs the parent's filesystem unmounted and its device down.
//!
//! A Settle's kernel work (the holder's unmount and the device's removal)
//! runs outside the mutex ([`crate::ops::Tail`]), the layer marked
//! [`InFlight`] meanwhile: a request that needs that layer waits for it,
//! every other goes ahead.
//!
//! What must never happen: a job skipped or run twice, or a job run out of
//! order with one queued before it; a layer used while its tail runs.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Condvar, Mutex},
};

/// Layers whose job's kernel work runs outside the server's mutex.
#[derive(Debug, Default)]
pub struct InFlight {
    layers: Mutex<BTreeSet<String>>,
    done: Condvar,
}

impl InFlight {
    /// `layer`'s tail starts.
    pub fn begin(&self, layer: &str) {
        self.lock().insert(layer.to_owned());
    }

    /// `layer`'s tail ended: whoever waits for it goes on.
    pub fn end(&self, layer: &str) {
        self.lock().remove(layer);
        self.done.notify_all();
    }

    /// Waits until `layer` (`None`: every layer) has no tail running.
    pub fn wait(&self, layer: Option<&str>) {
        let mut set = self.lock();
        while layer.map_or(!set.is_empty(), |l| set.contains(l)) {
            set = self.done.wait(set).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// What is in flight now.
    pub fn held(&self) -> BTreeSet<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.layers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One deferred piece of work on a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// After Commit: the committed snapshot `key`'s holder unmounted, its
    /// own bytes measured if the commit did not, its device torn down.
    Settle {
        /// The committed snapshot's name.
        key: String,
        /// Its layer.
        layer: String,
    },
    /// After Remove (its record is gone): the holder unmounted and the
    /// layer removed (its thin id to the pool's trash for the next reclaim).
    Remove {
        /// The removed snapshot's layer.
        layer: String,
    },
}

impl Job {
    /// The layer the job works on.
    pub fn layer(&self) -> &str {
        match self {
            Job::Settle { layer, .. } | Job::Remove { layer } => layer,
        }
    }

    /// The job's name in the log.
    pub fn name(&self) -> &'static str {
        match self {
            Job::Settle { .. } => "settle",
            Job::Remove { .. } => "remove",
        }
    }
}

/// The queued jobs, oldest first.
#[derive(Debug, Default)]
pub struct Queue {
    jobs: VecDeque<Job>,
}

impl Queue {
    /// Queues `job` after every other.
    pub fn push(&mut self, job: Job) {
        self.jobs.push_back(job);
    }

    /// The oldest job, taken off the queue.
    pub fn pop(&mut self) -> Option<Job> {
        self.jobs.pop_front()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// How many jobs are queued.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether a job on `layer` is queued.
    pub fn touches(&self, layer: &str) -> bool {
        self.jobs.iter().any(|j| j.layer() == layer)
    }

    /// The jobs to run before `layer` is used, taken off the queue in
    /// order: every job up to and including the last one on `layer` (the
    /// ones before it may be what it needs, as a child's removal is for its
    /// parent's). Empty when no job is on `layer`.
    pub fn take_through(&mut self, layer: &str) -> Vec<Job> {
        match self.jobs.iter().rposition(|j| j.layer() == layer) {
            Some(last) => self.jobs.drain(..=last).collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(l: &str) -> Job {
        Job::Settle {
            key: format!("k-{l}"),
            layer: l.to_owned(),
        }
    }

    fn remove(l: &str) -> Job {
        Job::Remove {
            layer: l.to_owned(),
        }
    }

    #[test]
    fn a_waiter_goes_on_when_its_layer_ends() {
        let f = std::sync::Arc::new(InFlight::default());
        f.begin("a");
        f.begin("b");
        f.wait(Some("c"));
        let g = f.clone();
        let waiter = std::thread::spawn(move || g.wait(Some("a")));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished(), "went on while `a` ran");
        f.end("a");
        waiter.join().unwrap();
        let g = f.clone();
        let all = std::thread::spawn(move || g.wait(None));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!all.is_finished(), "went on while `b` ran");
        f.end("b");
        all.join().unwrap();
    }

    #[test]
    fn fifo() {
        let mut q = Queue::default();
        assert!(q.is_empty());
        q.push(settle("a"));
        q.push(remove("b"));
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(), Some(settle("a")));
        assert_eq!(q.pop(), Some(remove("b")));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_layer_in_use_runs_its_jobs_and_those_before_them() {
        let mut q = Queue::default();
        q.push(remove("child"));
        q.push(settle("p"));
        q.push(settle("other"));
        assert!(q.touches("p"));
        assert!(!q.touches("nobody"));
        assert!(q.take_through("nobody").is_empty());
        assert_eq!(q.len(), 3, "nothing taken for a layer without jobs");
        // The child's removal was queued first: it runs first, in order.
        assert_eq!(q.take_through("p"), vec![remove("child"), settle("p")]);
        assert_eq!(q.pop(), Some(settle("other")));
    }

    #[test]
    fn the_last_job_on_the_layer_bounds_what_runs() {
        let mut q = Queue::default();
        q.push(settle("p"));
        q.push(settle("x"));
        q.push(remove("p"));
        q.push(settle("y"));
        assert_eq!(
            q.take_through("p"),
            vec![settle("p"), settle("x"), remove("p")]
        );
        assert_eq!(q.len(), 1);
        assert!(!q.touches("p"));
    }
}
