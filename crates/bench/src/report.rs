//! Samples, their medians and 95th percentiles, the terminal table with
//! its ratios, and the JSON file.

use std::{collections::BTreeMap, path::Path};

use serde::Serialize;

use crate::{
    Params,
    error::{IoContext, Result},
};

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// The backend (`thinlayer`, `floor`, `overlay-ext4`, ...).
    pub backend: String,
    /// The workload (`create`, `first-write`, ...).
    pub workload: String,
    /// Its parameter: population, file size, block size... (0 if none).
    pub param: u64,
    /// What was measured: `ms`, `bytes`, `MB/s`, ...
    pub metric: String,
    /// The value.
    pub value: f64,
}

/// Median and 95th percentile of the samples of one figure.
#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    /// The backend.
    pub backend: String,
    /// The workload.
    pub workload: String,
    /// Its parameter.
    pub param: u64,
    /// The metric.
    pub metric: String,
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Quick mode or full.
    pub quick: bool,
    /// Sizes and counts used.
    pub params: Params,
    /// The backends measured, in table order.
    pub backends: Vec<String>,
    /// The disk loop files were measured against (`--disk`), if any: its
    /// pair's samples are workload `loop-vs-disk`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Kernel release of the run.
    pub kernel: String,
    /// Every sample.
    pub samples: Vec<Sample>,
    /// Median and p95 per figure.
    pub stats: Vec<Stat>,
    /// Things the reader must know (skipped parts, what a figure means).
    pub notes: Vec<String>,
    /// Seconds each phase of the run took.
    pub phases: Vec<(String, f64)>,
    /// Wall time of the whole run, seconds.
    pub wall_seconds: f64,
}

/// Median and nearest-rank 95th percentile of `v` (empty: NaN).
pub fn median_p95(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    // Nearest rank: the smallest r with r >= 0.95 n, i.e. ceil(19 n / 20).
    let rank = (19 * n).div_ceil(20);
    (median, s[rank.clamp(1, n) - 1])
}

impl Report {
    /// Groups the samples into [`Stat`]s.
    pub fn compute_stats(&mut self) {
        let mut groups: BTreeMap<(String, String, u64, String), Vec<f64>> = BTreeMap::new();
        for s in &self.samples {
            groups
                .entry((
                    s.backend.clone(),
                    s.workload.clone(),
                    s.param,
                    s.metric.clone(),
                ))
                .or_default()
                .push(s.value);
        }
        self.stats = groups
            .into_iter()
            .map(|((backend, workload, param, metric), v)| {
                let (median, p95) = median_p95(&v);
                Stat {
                    backend,
                    workload,
                    param,
                    metric,
                    n: v.len(),
                    median,
                    p95,
                }
            })
            .collect();
    }

    /// The stat of one figure, if measured.
    pub fn stat(&self, backend: &str, workload: &str, param: u64, metric: &str) -> Option<&Stat> {
        self.stats.iter().find(|s| {
            s.backend == backend && s.workload == workload && s.param == param && s.metric == metric
        })
    }

    pub(crate) fn median(
        &self,
        backend: &str,
        workload: &str,
        param: u64,
        metric: &str,
    ) -> Option<f64> {
        self.stat(backend, workload, param, metric)
            .map(|s| s.median)
    }

    /// Writes the whole report as JSON.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("plain data");
        std::fs::write(path, text).ctx(|| format!("write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::median_p95;

    #[test]
    fn median_and_p95_by_nearest_rank() {
        let (m, p) = median_p95(&[5.0, 1.0, 3.0]);
        assert_eq!((m, p), (3.0, 5.0));
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let (m, p) = median_p95(&v);
        assert_eq!((m, p), (10.5, 19.0));
        assert!(median_p95(&[]).0.is_nan());
    }
}
