//! Results of the grid tasks (pass key, lines, copy) and of perplexity, as markdown tables, JSON
//! and a PNG heatmap of the score by length (columns) and depth (rows), one panel per attention
//! configuration, as in the needle-in-a-haystack and MoA papers.
//!
//! The heatmap draws its labels with a built-in pixel font (no font file needed); red is 0,
//! yellow 0.5 and green 1 (accuracy), grey a cell without trials. It is written beside its path
//! and renamed into place.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use super::font;
use super::ppl::PplResult;
use super::EvalError;

/// One trial of a grid task.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trial {
    /// Attention configuration label.
    pub config: String,
    /// Requested prompt length in tokens.
    pub length: usize,
    /// Requested depth (fraction of the context).
    pub depth: f64,
    pub index: usize,
    pub seed: u64,
    /// Actual prompt length in tokens.
    pub prompt_tokens: usize,
    /// Token index of what must be retrieved (needle, asked line, first passage).
    pub target_pos: usize,
    /// 1/0 for right/wrong answers; top-1 accuracy on the repeat for copy.
    pub score: f64,
    /// Mean loss on the repeat (copy).
    pub loss: Option<f64>,
    /// Mean loss on the passage's first occurrence, where there is nothing to copy (copy).
    pub baseline_loss: Option<f64>,
    /// Loss of the answer's first token alone (pass key with `--key-loss`): greedy answers are
    /// lost at the first token (" a" instead of the key's first digit), so this is the
    /// continuous measure closest to the pass/fail score.
    pub first_loss: Option<f64>,
    pub expected: String,
    pub answer: String,
    /// Planned length the cache was sized for.
    pub n_plan: usize,
    pub kv_bytes: usize,
    pub kv_bytes_dense: usize,
    pub seconds: f64,
}

/// A grid task's results and what was asked for.
#[derive(Debug, Clone)]
pub struct Grid {
    /// `passkey`, `lines`, `copy`.
    pub task: String,
    /// What `score` means, for headings: `accuracy (%)`, `top-1 copy accuracy (%)`.
    pub metric: String,
    pub configs: Vec<String>,
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub trials: Vec<Trial>,
}

/// `1k` for multiples of 1024, else the number.
pub fn length_label(n: usize) -> String {
    if n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else if n.is_multiple_of(512) {
        format!("{}k", n as f64 / 1024.0)
    } else {
        n.to_string()
    }
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v {
        s += x;
        n += 1;
    }
    (n > 0).then(|| s / n as f64)
}

impl Grid {
    fn cell_trials<'a>(
        &'a self,
        config: &'a str,
        length: Option<usize>,
        depth: Option<f64>,
    ) -> impl Iterator<Item = &'a Trial> + 'a {
        self.trials.iter().filter(move |t| {
            t.config == config
                && length.is_none_or(|l| t.length == l)
                && depth.is_none_or(|d| t.depth == d)
        })
    }

    /// Mean score of the trials of a configuration at a length and depth (`None`: all).
    pub fn score(&self, config: &str, length: Option<usize>, depth: Option<f64>) -> Option<f64> {
        mean(self.cell_trials(config, length, depth).map(|t| t.score))
    }

    /// Mean loss (copy) of the trials at a length and depth (`None`: all).
    pub fn loss(&self, config: &str, length: Option<usize>, depth: Option<f64>) -> Option<f64> {
        mean(
            self.cell_trials(config, length, depth)
                .filter_map(|t| t.loss),
        )
    }

    /// KV bytes of a configuration's longest trial, with the dense figure and planned length.
    pub fn kv_at_longest(&self, config: &str) -> Option<(usize, usize, usize)> {
        self.cell_trials(config, None, None)
            .max_by_key(|t| t.n_plan)
            .map(|t| (t.kv_bytes, t.kv_bytes_dense, t.n_plan))
    }

    fn pct(v: Option<f64>) -> String {
        v.map_or("-".into(), |v| format!("{:.0}", v * 100.0))
    }

    /// The markdown report: a summary (configs x lengths, mean over depths, with KV bytes), the
    /// copy loss table when there are losses, and one depth x length table per configuration.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let depths: Vec<String> = self.depths.iter().map(|d| format!("{d}")).collect();
        let trials = self.trials.iter().map(|t| t.index + 1).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "**{}**: {} by length, mean over depths {} ({} trial{} per cell)\n",
            self.task,
            self.metric,
            depths.join(", "),
            trials,
            if trials == 1 { "" } else { "s" }
        );
        let head: Vec<String> = self.lengths.iter().map(|&l| length_label(l)).collect();
        let _ = writeln!(
            s,
            "| config | KV cache (longest) | {} | all |",
            head.join(" | ")
        );
        let _ = writeln!(s, "|---|---:|{}---:|", "---:|".repeat(self.lengths.len()));
        for c in &self.configs {
            let kv = self.kv_at_longest(c).map_or("-".into(), |(kv, dense, n)| {
                format!(
                    "{} of {} at {n} ({:.0}%)",
                    mib(kv),
                    mib(dense),
                    100.0 * kv as f64 / dense.max(1) as f64
                )
            });
            let cells: Vec<String> = self
                .lengths
                .iter()
                .map(|&l| Self::pct(self.score(c, Some(l), None)))
                .collect();
            let _ = writeln!(
                s,
                "| {c} | {kv} | {} | {} |",
                cells.join(" | "),
                Self::pct(self.score(c, None, None))
            );
        }
        if self.trials.iter().any(|t| t.loss.is_some()) {
            let what = match self.task.as_str() {
                "passkey" => "the key's tokens after the prompt",
                _ => "the repeated passage",
            };
            let _ = writeln!(
                s,
                "\nMean loss on {what} (nats per token; lower is better), by length:\n"
            );
            let _ = writeln!(s, "| config | {} | all |", head.join(" | "));
            let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(self.lengths.len()));
            for c in &self.configs {
                let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
                let cells: Vec<String> = self
                    .lengths
                    .iter()
                    .map(|&l| f(self.loss(c, Some(l), None)))
                    .collect();
                let _ = writeln!(
                    s,
                    "| {c} | {} | {} |",
                    cells.join(" | "),
                    f(self.loss(c, None, None))
                );
            }
            let base = |l: Option<usize>| {
                mean(
                    self.trials
                        .iter()
                        .filter(|t| l.is_none_or(|l| t.length == l))
                        .filter_map(|t| t.baseline_loss),
                )
            };
            let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
            if base(None).is_some() {
                let cells: Vec<String> = self.lengths.iter().map(|&l| f(base(Some(l)))).collect();
                let _ = writeln!(
                    s,
                    "| (first occurrence: nothing to copy) | {} | {} |",
                    cells.join(" | "),
                    f(base(None))
                );
            }
        }
        for c in &self.configs {
            let _ = writeln!(
                s,
                "\n{} by depth (rows) and length (columns), {c}:\n",
                self.metric
            );
            let _ = writeln!(s, "| depth | {} |", head.join(" | "));
            let _ = writeln!(s, "|---:|{}", "---:|".repeat(self.lengths.len()));
            for &d in &self.depths {
                let cells: Vec<String> = self
                    .lengths
                    .iter()
                    .map(|&l| Self::pct(self.score(c, Some(l), Some(d))))
                    .collect();
                let _ = writeln!(s, "| {d} | {} |", cells.join(" | "));
            }
        }
        s
    }

    /// The report as JSON: settings, a summary per configuration and every trial.
    pub fn json(&self) -> serde_json::Value {
        let summary: Vec<serde_json::Value> = self
            .configs
            .iter()
            .map(|c| {
                let kv = self.kv_at_longest(c);
                json!({
                    "config": c,
                    "score": self.score(c, None, None),
                    "loss": self.loss(c, None, None),
                    "first_loss": mean(self.cell_trials(c, None, None).filter_map(|t| t.first_loss)),
                    "by_length": self.lengths.iter().map(|&l| json!({
                        "length": l,
                        "score": self.score(c, Some(l), None),
                        "loss": self.loss(c, Some(l), None),
                        "by_depth": self.depths.iter().map(|&d| json!({
                            "depth": d, "score": self.score(c, Some(l), Some(d)),
                            "loss": self.loss(c, Some(l), Some(d)),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                    "kv_bytes_longest": kv.map(|k| k.0),
                    "kv_bytes_dense_longest": kv.map(|k| k.1),
                    "n_plan_longest": kv.map(|k| k.2),
                })
            })
            .collect();
        json!({
            "task": self.task,
            "metric": self.metric,
            "configs": self.configs,
            "lengths": self.lengths,
            "depths": self.depths,
            "summary": summary,
            "trials": self.trials,
        })
    }
}

/// Perplexity results as a markdown table.
pub fn ppl_markdown(results: &[PplResult]) -> String {
    let mut s = String::from(
        "| config | n_ctx | chunks | PPL | +/- | density | KV cache | dense KV |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.4} | {:.4} | {:.3} | {} | {} |",
            r.config,
            r.n_ctx,
            r.n_chunks,
            r.ppl,
            r.err,
            r.density,
            mib(r.kv_bytes),
            mib(r.kv_bytes_dense)
        );
    }
    s
}

/// Red (0) - yellow (0.5) - green (1).
pub fn color(v: f64) -> (u8, u8, u8) {
    let v = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64, t: f64| (a + (b - a) * t).round() as u8;
    let (red, yellow, green) = ((215., 48., 39.), (254., 224., 110.), (26., 152., 80.));
    if v < 0.5 {
        let t = v * 2.0;
        (
            lerp(red.0, yellow.0, t),
            lerp(red.1, yellow.1, t),
            lerp(red.2, yellow.2, t),
        )
    } else {
        let t = (v - 0.5) * 2.0;
        (
            lerp(yellow.0, green.0, t),
            lerp(yellow.1, green.1, t),
            lerp(yellow.2, green.2, t),
        )
    }
}

const CELL_W: u32 = 52;
const CELL_H: u32 = 30;
const SCALE: u32 = 2;

/// Writes the heatmap: one panel per configuration (title on top), depths down (0 at the top),
/// lengths across, the score in percent in every cell.
pub fn write_png(grid: &Grid, title: &str, path: &Path) -> Result<(), EvalError> {
    use plotters::prelude::*;

    let err = |reason: String| EvalError::Png {
        path: path.display().to_string(),
        reason,
    };
    if grid.configs.is_empty() || grid.lengths.is_empty() || grid.depths.is_empty() {
        return Err(err("nothing to draw".into()));
    }
    let name = path
        .file_name()
        .ok_or_else(|| err("the path has no file name".into()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}.png",
        name.to_string_lossy(),
        std::process::id()
    ));
    let th = font::height(SCALE);
    let (cols, rows) = (grid.lengths.len() as u32, grid.depths.len() as u32);
    let label_w = font::width("DEPTH", SCALE).max(font::width("0.00", SCALE)) + 10;
    let panel_w = (label_w + cols * CELL_W).max(label_w + font::width("LENGTH (TOKENS)", SCALE));
    let panel_w = grid
        .configs
        .iter()
        .map(|c| font::width(c, SCALE) + label_w)
        .fold(panel_w, u32::max);
    let gap = 24;
    let top = 10 + th + 10 + th + 8; // figure title, panel title
    let width = (grid.configs.len() as u32 * (panel_w + gap)).max(font::width(title, SCALE) + 20);
    let height = top + rows * CELL_H + 8 + th + 10 + th + 10;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(&tmp, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let text =
            |s: &str, x: i32, y: i32, c: RGBColor| -> Result<(), Box<dyn std::error::Error>> {
                let px = SCALE as i32;
                for (x, y) in font::squares(s, x, y, SCALE) {
                    root.draw(&Rectangle::new([(x, y), (x + px, y + px)], c.filled()))?;
                }
                Ok(())
            };
        text(title, 10, 10, BLACK)?;
        for (k, c) in grid.configs.iter().enumerate() {
            let x0 = (k as u32 * (panel_w + gap) + 10) as i32;
            let y_title = (10 + th + 10) as i32;
            text(c, x0 + label_w as i32, y_title, BLACK)?;
            let y0 = top as i32;
            for (r, &d) in grid.depths.iter().enumerate() {
                let y = y0 + (r as u32 * CELL_H) as i32;
                let dl = format!("{d:.2}");
                text(&dl, x0, y + (CELL_H - th) as i32 / 2, BLACK)?;
                for (ci, &l) in grid.lengths.iter().enumerate() {
                    let x = x0 + label_w as i32 + (ci as u32 * CELL_W) as i32;
                    let v = grid.score(c, Some(l), Some(d));
                    let (cr, cg, cb) = v.map_or((200, 200, 200), color);
                    root.draw(&Rectangle::new(
                        [(x, y), (x + CELL_W as i32 - 1, y + CELL_H as i32 - 1)],
                        RGBColor(cr, cg, cb).filled(),
                    ))?;
                    if let Some(v) = v {
                        let s = format!("{:.0}", v * 100.0);
                        let w = font::width(&s, SCALE) as i32;
                        text(
                            &s,
                            x + (CELL_W as i32 - w) / 2,
                            y + (CELL_H - th) as i32 / 2,
                            BLACK,
                        )?;
                    }
                }
            }
            let yl = y0 + (rows * CELL_H + 8) as i32;
            for (ci, &l) in grid.lengths.iter().enumerate() {
                let s = length_label(l);
                let w = font::width(&s, SCALE) as i32;
                let x = x0 + label_w as i32 + (ci as u32 * CELL_W) as i32;
                text(&s, x + (CELL_W as i32 - w) / 2, yl, BLACK)?;
            }
            text("DEPTH", x0, yl, RGBColor(90, 90, 90))?;
            text(
                "LENGTH (TOKENS)",
                x0 + label_w as i32,
                yl + (th + 10) as i32,
                RGBColor(90, 90, 90),
            )?;
        }
        root.present()?;
        Ok(())
    };
    let result = draw()
        .map_err(|e| err(e.to_string()))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| err(e.to_string())));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(config: &str, length: usize, depth: f64, score: f64) -> Trial {
        Trial {
            config: config.into(),
            length,
            depth,
            index: 0,
            seed: 0,
            prompt_tokens: length,
            target_pos: 0,
            score,
            loss: None,
            baseline_loss: None,
            first_loss: None,
            expected: String::new(),
            answer: String::new(),
            n_plan: length + 8,
            kv_bytes: length * 10,
            kv_bytes_dense: length * 20,
            seconds: 0.0,
        }
    }

    fn grid() -> Grid {
        Grid {
            task: "passkey".into(),
            metric: "accuracy (%)".into(),
            configs: vec!["dense".into(), "uniform 0.5".into()],
            lengths: vec![1024, 2048],
            depths: vec![0.0, 1.0],
            trials: vec![
                t("dense", 1024, 0.0, 1.0),
                t("dense", 1024, 1.0, 1.0),
                t("dense", 2048, 0.0, 0.0),
                t("dense", 2048, 1.0, 1.0),
                t("uniform 0.5", 1024, 0.0, 0.0),
                t("uniform 0.5", 1024, 1.0, 1.0),
            ],
        }
    }

    #[test]
    fn aggregates_and_tables() {
        let g = grid();
        assert_eq!(g.score("dense", None, None), Some(0.75));
        assert_eq!(g.score("dense", Some(2048), None), Some(0.5));
        assert_eq!(g.score("uniform 0.5", Some(2048), None), None);
        assert_eq!(g.kv_at_longest("dense"), Some((20480, 40960, 2056)));
        let md = g.markdown();
        assert!(
            md.contains("| dense | 0.0 MiB of 0.0 MiB at 2056 (50%) | 100 | 50 | 75 |"),
            "{md}"
        );
        assert!(
            md.contains("| uniform 0.5 | 0.0 MiB of 0.0 MiB at 1032 (50%) | 50 | - | 50 |"),
            "{md}"
        );
        assert!(md.contains("| 0 | 100 | 0 |"), "{md}");
        assert!(!md.contains("repeated passage"));
        let j = g.json();
        assert_eq!(j["summary"][0]["score"], 0.75);
        assert_eq!(j["trials"].as_array().unwrap().len(), 6);
    }

    #[test]
    fn heatmap_png_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.png");
        write_png(&grid(), "PASS KEY", &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let e = write_png(&grid(), "x", &dir.path().join("no/such/dir/h.png")).unwrap_err();
        assert!(e.to_string().contains("h.png"), "{e}");
    }

    #[test]
    fn colors_and_labels() {
        assert_eq!(color(0.0), (215, 48, 39));
        assert_eq!(color(1.0), (26, 152, 80));
        assert_eq!(color(0.5), (254, 224, 110));
        assert_eq!(length_label(7168), "7k");
        assert_eq!(length_label(1536), "1.5k");
        assert_eq!(length_label(1000), "1000");
    }
}
