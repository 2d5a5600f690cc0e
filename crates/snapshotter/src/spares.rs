//! How many spares (snapshots provisioned ahead of demand, see
//! `thinlayer_pool::Pool::provision`) each committed parent keeps: a pure
//! tracker of Prepares, the clock passed in.
//!
//! A parent with a Prepare within the last `idle` keeps as many spares as
//! it had children live at once at its busiest Prepare in that window,
//! plus `headroom` (so containers run one after another keep 1 + headroom
//! ready, a burst of k keeps k + headroom), at most [`PER_PARENT`]; a
//! parent idle for `idle` falls back to 0. The headroom is for spares
//! whose making ends after the worker's step (a mount outside the lock): a
//! Prepare then takes one made earlier while the next one mounts. All
//! parents together keep at most `total`: the parents prepared most
//! recently first get one each, then more in the same order.
//!
//! What must never happen: more than `total` spares wanted, or a parent
//! kept at a count the worker did not set (the tracker only learns what
//! the pool holds through [`Demand::kept`]).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

/// The most spares one parent keeps.
pub const PER_PARENT: usize = 4;

/// Recent Prepares per parent layer and the spares each was last given.
#[derive(Debug)]
pub struct Demand {
    total: usize,
    idle: Duration,
    headroom: usize,
    /// Per parent: (when, spares wanted after that Prepare: children live
    /// then plus the headroom), oldest first.
    prepares: HashMap<String, VecDeque<(Instant, usize)>>,
    /// Per parent: the spares the worker last kept (absent: 0).
    kept: HashMap<String, usize>,
    /// Parents prepared since the worker last kept their spares: a
    /// Prepare may have taken one.
    taken: Vec<String>,
    /// Per parent: the spares ready now, as the last Prepare or the
    /// worker left them (absent: 0).
    ready: HashMap<String, usize>,
}

impl Demand {
    /// A tracker keeping at most `total` spares (0: none), `headroom`
    /// more per busy parent than it had children live at once, dropping a
    /// parent's after `idle` without a Prepare.
    pub fn new(total: usize, idle: Duration, headroom: usize) -> Demand {
        Demand {
            total,
            idle,
            headroom,
            prepares: HashMap::new(),
            kept: HashMap::new(),
            taken: Vec::new(),
            ready: HashMap::new(),
        }
    }

    /// A Prepare on `parent` at `now`, after which it has `live` active
    /// or view children and `ready` spares.
    pub fn prepared(&mut self, parent: &str, live: usize, ready: usize, now: Instant) {
        self.ready.insert(parent.to_owned(), ready);
        self.prepares
            .entry(parent.to_owned())
            .or_default()
            .push_back((now, live.max(1) + self.headroom));
        if !self.taken.iter().any(|p| p == parent) {
            self.taken.push(parent.to_owned());
        }
    }

    /// Spares of `parent` the pool already holds (found at start): kept
    /// as if prepared at `now`, so they last one idle window.
    pub fn adopt(&mut self, parent: &str, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.kept.insert(parent.to_owned(), n);
        self.ready.insert(parent.to_owned(), n);
        self.prepares
            .entry(parent.to_owned())
            .or_default()
            .push_back((now, n));
    }

    /// `parent` is gone (removed): no spares, no history.
    pub fn forget(&mut self, parent: &str) {
        self.prepares.remove(parent);
        self.kept.remove(parent);
        self.ready.remove(parent);
        self.taken.retain(|p| p != parent);
    }

    /// The worker kept `n` spares of `parent`.
    pub fn kept(&mut self, parent: &str, n: usize) {
        self.taken.retain(|p| p != parent);
        self.ready.insert(parent.to_owned(), n);
        if n == 0 {
            self.kept.remove(parent);
        } else {
            self.kept.insert(parent.to_owned(), n);
        }
    }

    /// How many spares each parent with recent demand should keep.
    pub fn targets(&mut self, now: Instant) -> BTreeMap<String, usize> {
        let idle = self.idle;
        self.prepares.retain(|_, q| {
            while q
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) >= idle)
            {
                q.pop_front();
            }
            !q.is_empty()
        });
        // (latest Prepare, parent, wanted), the latest first.
        let mut want: Vec<(Instant, &String, usize)> = self
            .prepares
            .iter()
            .map(|(p, q)| {
                let last = q.back().map_or(now, |(t, _)| *t);
                let peak = q.iter().map(|(_, n)| *n).max().unwrap_or(1);
                (last, p, peak.min(PER_PARENT))
            })
            .collect();
        want.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        let mut left = self.total;
        // One each first, then the rest, the latest parents first.
        for round in [1usize, PER_PARENT] {
            for (_, p, w) in &want {
                let have = out.get(*p).copied().unwrap_or(0);
                let more = (*w).min(round).saturating_sub(have).min(left);
                if more > 0 {
                    out.insert((*p).clone(), have + more);
                    left -= more;
                }
            }
        }
        out
    }

    /// The parents whose spares the worker should set now, with the count:
    /// those whose target differs from what it kept, and those a Prepare
    /// may have taken one of.
    pub fn due(&mut self, now: Instant) -> Vec<(String, usize)> {
        let targets = self.targets(now);
        let mut out: Vec<(String, usize)> = Vec::new();
        for p in self.kept.keys() {
            if !targets.contains_key(p) {
                out.push((p.clone(), 0));
            }
        }
        for (p, &n) in &targets {
            let kept = self.kept.get(p).copied().unwrap_or(0);
            if kept != n || self.taken.contains(p) {
                out.push((p.clone(), n));
            }
        }
        out.sort();
        out
    }

    /// Whether `parent`'s spares are due now rather than in the next
    /// pause of requests: it has none ready and its target is above zero
    /// (the next Prepare on it would make a snapshot itself).
    pub fn urgent(&self, parent: &str, target: usize) -> bool {
        target > 0 && self.ready.get(parent).copied().unwrap_or(0) == 0
    }

    /// When the next parent falls idle (the worker wakes then), if any
    /// keeps spares.
    pub fn next_change(&self) -> Option<Instant> {
        self.kept
            .keys()
            .filter_map(|p| self.prepares.get(p).and_then(|q| q.front()))
            .map(|(t, _)| *t + self.idle)
            .min()
    }

    /// The spares kept over all parents.
    pub fn total_kept(&self) -> usize {
        self.kept.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn sequential_containers_keep_one_then_none_when_idle() {
        let t0 = Instant::now();
        let mut d = Demand::new(8, secs(300), 0);
        assert!(d.due(t0).is_empty());
        for i in 0..5 {
            d.prepared("img", 1, 0, t0 + secs(i * 10));
            let due = d.due(t0 + secs(i * 10));
            assert_eq!(due, vec![("img".to_owned(), 1)], "prepare {i}");
            d.kept("img", 1);
            assert!(d.due(t0 + secs(i * 10 + 1)).is_empty());
        }
        assert_eq!(d.total_kept(), 1);
        // The first Prepare ages out first; the last one keeps it.
        assert_eq!(d.next_change(), Some(t0 + secs(300)));
        assert!(d.due(t0 + secs(339)).is_empty());
        assert_eq!(d.due(t0 + secs(340)), vec![("img".to_owned(), 0)]);
        d.kept("img", 0);
        assert_eq!(d.total_kept(), 0);
        assert!(d.due(t0 + secs(400)).is_empty());
        assert_eq!(d.next_change(), None);
    }

    #[test]
    fn a_burst_keeps_as_many_as_ran_at_once_within_the_bound() {
        let t0 = Instant::now();
        let mut d = Demand::new(8, secs(60), 0);
        for live in 1..=3 {
            d.prepared("p", live, 0, t0);
        }
        assert_eq!(d.due(t0), vec![("p".to_owned(), 3)]);
        d.kept("p", 3);
        for live in 4..=9 {
            d.prepared("p", live, 0, t0 + secs(1));
        }
        assert_eq!(d.due(t0 + secs(1)), vec![("p".to_owned(), PER_PARENT)]);
    }

    #[test]
    fn the_total_bound_gives_one_each_to_the_latest_parents_first() {
        let t0 = Instant::now();
        let mut d = Demand::new(3, secs(60), 0);
        d.prepared("old", 4, 0, t0);
        d.prepared("mid", 4, 0, t0 + secs(1));
        d.prepared("new", 4, 0, t0 + secs(2));
        d.prepared("newest", 1, 0, t0 + secs(3));
        let t = d.targets(t0 + secs(3));
        assert_eq!(t.values().sum::<usize>(), 3);
        assert_eq!(t.get("newest"), Some(&1));
        assert_eq!(t.get("new"), Some(&1));
        assert_eq!(t.get("mid"), Some(&1));
        assert_eq!(t.get("old"), None);
        let mut d = Demand::new(5, secs(60), 0);
        d.prepared("a", 4, 0, t0);
        d.prepared("b", 1, 0, t0 + secs(1));
        let t = d.targets(t0 + secs(1));
        assert_eq!((t["a"], t["b"]), (4, 1));
    }

    #[test]
    fn zero_total_keeps_none_and_forget_drops_a_parent() {
        let t0 = Instant::now();
        let mut d = Demand::new(0, secs(60), 1);
        d.prepared("p", 2, 0, t0);
        assert!(d.targets(t0).is_empty());
        assert!(d.due(t0).is_empty());
        let mut d = Demand::new(8, secs(60), 0);
        d.prepared("p", 1, 0, t0);
        d.kept("p", 1);
        d.forget("p");
        assert!(d.due(t0).is_empty());
        assert_eq!(d.total_kept(), 0);
    }

    #[test]
    fn adopted_spares_last_one_window_at_most_their_count() {
        let t0 = Instant::now();
        let mut d = Demand::new(8, secs(60), 0);
        d.adopt("p", 2, t0);
        d.adopt("none", 0, t0);
        assert!(d.due(t0).is_empty(), "kept as found");
        assert_eq!(d.next_change(), Some(t0 + secs(60)));
        assert_eq!(d.due(t0 + secs(60)), vec![("p".to_owned(), 0)]);
    }

    #[test]
    fn headroom_keeps_one_more_per_busy_parent_within_both_bounds() {
        let t0 = Instant::now();
        let mut d = Demand::new(8, secs(60), 1);
        d.prepared("seq", 1, 0, t0);
        assert_eq!(
            d.due(t0),
            vec![("seq".to_owned(), 2)],
            "one taken, one mounting"
        );
        d.kept("seq", 2);
        d.prepared("seq", 1, 0, t0 + secs(1));
        assert_eq!(
            d.due(t0 + secs(1)),
            vec![("seq".to_owned(), 2)],
            "topped up"
        );
        d.prepared("burst", PER_PARENT, 0, t0 + secs(2));
        assert_eq!(
            d.targets(t0 + secs(2))["burst"],
            PER_PARENT,
            "the per-parent bound holds"
        );
        // The total bound still gives one each first.
        let mut d = Demand::new(2, secs(60), 1);
        d.prepared("a", 1, 0, t0);
        d.prepared("b", 1, 0, t0 + secs(1));
        let t = d.targets(t0 + secs(1));
        assert_eq!((t["a"], t["b"]), (1, 1));
        assert_eq!(
            d.due(t0 + secs(61)),
            Vec::new(),
            "idle: nothing kept, nothing due"
        );
        // A parent with none ready is urgent; one with a spare left waits.
        let mut d = Demand::new(8, secs(60), 1);
        assert!(d.urgent("p", 2), "never kept: none ready");
        d.kept("p", 2);
        d.prepared("p", 1, 1, t0);
        assert!(!d.urgent("p", 2), "one left");
        d.prepared("p", 1, 0, t0);
        assert!(d.urgent("p", 2), "the last one taken");
        assert!(!d.urgent("p", 0), "a drop is never urgent");
        // Adopted spares are kept as found, headroom or not.
        let mut d = Demand::new(8, secs(60), 1);
        d.adopt("p", 1, t0);
        assert!(d.due(t0).is_empty(), "kept as found");
    }
}
