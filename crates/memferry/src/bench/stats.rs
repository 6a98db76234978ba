//! Medians and spreads: every figure is the median of several runs.

use serde::Serialize;

/// Spread above which a figure is flagged as noisy.
pub const NOISY_SPREAD: f64 = 0.10;

/// A median over runs with its spread.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// Median GiB/s.
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
    /// (max - min) / median.
    pub spread: f64,
    /// True when the spread exceeds 10%.
    pub noisy: bool,
    /// Every run, in order.
    pub runs: Vec<f64>,
}

impl Measurement {
    /// Summarises runs (GiB/s each); `None` for no runs.
    pub fn from_runs(runs: Vec<f64>) -> Option<Self> {
        if runs.is_empty() {
            return None;
        }
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let (min, max) = (sorted[0], sorted[n - 1]);
        let spread = if median > 0.0 {
            (max - min) / median
        } else {
            0.0
        };
        Some(Self {
            median,
            min,
            max,
            spread,
            noisy: spread > NOISY_SPREAD,
            runs,
        })
    }

    /// `1.23 ±4%`, with `(noisy)` past 10%.
    pub fn display(&self) -> String {
        format!(
            "{:.2} ±{:.0}%{}",
            self.median,
            self.spread * 100.0,
            if self.noisy { " (noisy)" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let m = Measurement::from_runs(vec![1.0, 3.0, 2.0]).unwrap();
        assert_eq!(m.median, 2.0);
        assert_eq!(m.spread, 1.0);
        assert!(m.noisy);
        let m = Measurement::from_runs(vec![2.0, 2.1, 2.05, 2.0]).unwrap();
        assert!((m.median - 2.025).abs() < 1e-9);
        assert!(!m.noisy);
        assert!(Measurement::from_runs(vec![]).is_none());
    }
}
