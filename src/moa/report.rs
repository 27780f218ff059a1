//! Describing a plan: spans per layer and KV head at one length, density and KV cache bytes at
//! several lengths (beside the dense figure), as text or JSON, and a PNG heatmap of `C_h / N`.
//!
//! KV bytes are those of one sequence with an f16 cache: `sum_h min(C_h, N) * head_dim * 2 (K
//! and V) * 2 bytes`; dense is `n_layer * n_kv_heads * N * head_dim * 4`.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use super::metadata::{PlanFileError, GRANULARITY_KV_HEAD};
use super::plan::Plan;

/// Density and KV cache size of a plan at one length.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LengthSummary {
    pub n: usize,
    /// `mean_h min(C_h, N) / N`.
    pub density: f64,
    /// f16 K and V bytes for one sequence under the plan.
    pub kv_bytes: u64,
    /// The same for dense attention (every head keeps N rows).
    pub dense_kv_bytes: u64,
}

/// f16 K+V bytes of one sequence at length `n` under `plan` (heads of dimension `head_dim`).
pub fn kv_bytes(plan: &Plan, head_dim: usize, n: usize) -> u64 {
    let rows: usize = plan.spans(n).iter().map(|&c| c.min(n)).sum();
    rows as u64 * head_dim as u64 * 4
}

/// f16 K+V bytes of one sequence at length `n` with dense attention.
pub fn dense_kv_bytes(plan: &Plan, head_dim: usize, n: usize) -> u64 {
    (plan.n_layer * plan.n_head_kv * n) as u64 * head_dim as u64 * 4
}

pub fn summarize(plan: &Plan, head_dim: usize, lengths: &[usize]) -> Vec<LengthSummary> {
    lengths
        .iter()
        .map(|&n| LengthSummary {
            n,
            density: plan.density_at(n),
            kv_bytes: kv_bytes(plan, head_dim, n),
            dense_kv_bytes: dense_kv_bytes(plan, head_dim, n),
        })
        .collect()
}

/// Bytes in MiB with two decimals.
pub fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The header lines: source, shape, constants, target density, lengths, note.
pub fn describe(plan: &Plan) -> String {
    let lengths: Vec<String> = plan.lengths.iter().map(u32::to_string).collect();
    let mut s = format!(
        "plan: source {:?}, {} layers x {} KV heads ({GRANULARITY_KV_HEAD}), sink {}, min span {}, align {}\n",
        plan.source, plan.n_layer, plan.n_head_kv, plan.sink, plan.min_span, plan.align
    );
    let _ = writeln!(
        s,
        "target density: {}; lengths: {}",
        plan.density
            .map(|d| d.to_string())
            .unwrap_or_else(|| "unknown".into()),
        if lengths.is_empty() {
            "none".into()
        } else {
            lengths.join(", ")
        }
    );
    if !plan.note.is_empty() {
        let _ = writeln!(s, "note: {}", plan.note);
    }
    s
}

/// The density / KV bytes table.
pub fn summary_table(rows: &[LengthSummary]) -> String {
    let mut s = format!(
        "{:>8}  {:>8}  {:>14}  {:>14}  {:>6}\n",
        "N", "density", "KV bytes (f16)", "dense", "ratio"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>8}  {:>8.4}  {:>14}  {:>14}  {:>6.3}",
            r.n,
            r.density,
            mib(r.kv_bytes),
            mib(r.dense_kv_bytes),
            r.kv_bytes as f64 / r.dense_kv_bytes.max(1) as f64
        );
    }
    s
}

/// Spans per layer (rows) and KV head (columns) at length `n`, capped at `n`.
pub fn span_table(plan: &Plan, n: usize) -> String {
    let spans = plan.spans(n);
    let w = n.to_string().len().max(4);
    let mut s = format!(
        "spans C_h at N = {n} (tokens; layers down, KV heads across):\n{:>5}",
        "layer"
    );
    for h in 0..plan.n_head_kv {
        let _ = write!(s, " {:>w$}", format!("h{h}"));
    }
    s.push('\n');
    for l in 0..plan.n_layer {
        let _ = write!(s, "{l:>5}");
        for h in 0..plan.n_head_kv {
            let _ = write!(s, " {:>w$}", spans[l * plan.n_head_kv + h].min(n));
        }
        s.push('\n');
    }
    s
}

/// The full text report: header, density/bytes table at `lengths`, span table at `table_n`.
pub fn show_text(plan: &Plan, head_dim: usize, lengths: &[usize], table_n: usize) -> String {
    let mut s = describe(plan);
    s.push('\n');
    s.push_str(&summary_table(&summarize(plan, head_dim, lengths)));
    s.push('\n');
    s.push_str(&span_table(plan, table_n));
    s
}

/// The same report as JSON.
pub fn show_json(
    plan: &Plan,
    head_dim: usize,
    lengths: &[usize],
    table_n: usize,
) -> serde_json::Value {
    let spans = plan.spans(table_n);
    let rows: Vec<Vec<usize>> = spans
        .chunks(plan.n_head_kv)
        .map(|r| r.iter().map(|&c| c.min(table_n)).collect())
        .collect();
    let rules: Vec<Vec<serde_json::Value>> = plan
        .rules
        .chunks(plan.n_head_kv)
        .map(|r| {
            r.iter()
                .map(|r| json!({"alpha": r.alpha, "beta": r.beta}))
                .collect()
        })
        .collect();
    json!({
        "granularity": GRANULARITY_KV_HEAD,
        "source": plan.source,
        "n_layer": plan.n_layer,
        "n_kv_heads": plan.n_head_kv,
        "head_dim": head_dim,
        "sink_tokens": plan.sink,
        "min_span": plan.min_span,
        "span_align": plan.align,
        "density": plan.density,
        "lengths": plan.lengths,
        "note": plan.note,
        "summary": summarize(plan, head_dim, lengths),
        "spans": {"n": table_n, "rows": rows},
        "rules": rules,
    })
}

/// Pixels per heatmap cell.
const CELL: u32 = 24;

/// Writes a heatmap of `min(C_h, N) / N` (layers down, KV heads across; viridis, dark = short
/// span, yellow = whole context) with a colour bar on the right, 0 at the bottom. No text, so no
/// font is needed. The file is written beside `path` and renamed into place.
pub fn write_heatmap_png(plan: &Plan, n: usize, path: &Path) -> Result<(), PlanFileError> {
    use plotters::prelude::*;

    if n == 0 {
        return Err(PlanFileError::invalid("length", "must be positive"));
    }
    let name = path.file_name().ok_or_else(|| {
        PlanFileError::invalid("png", format!("{} has no file name", path.display()))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // plotters picks the encoder from the extension, so the temporary name ends in .png.
    let tmp = dir.join(format!(
        ".{}.tmp-{}.png",
        name.to_string_lossy(),
        std::process::id()
    ));
    let (cols, rows) = (plan.n_head_kv as u32, plan.n_layer as u32);
    let (gap, bar) = (CELL / 2, CELL / 2);
    let width = cols * CELL + gap + bar;
    let height = rows * CELL;
    let spans = plan.spans(n);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(&tmp, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        for l in 0..rows {
            for h in 0..cols {
                let c = spans[(l * cols + h) as usize].min(n);
                let color = ViridisRGB.get_color(c as f32 / n as f32);
                let (x, y) = ((h * CELL) as i32, (l * CELL) as i32);
                // The far corner is exclusive: one white pixel separates neighbouring cells.
                root.draw(&Rectangle::new(
                    [(x, y), (x + CELL as i32 - 1, y + CELL as i32 - 1)],
                    color.filled(),
                ))?;
            }
        }
        let x0 = (cols * CELL + gap) as i32;
        for y in 0..height {
            let v = 1.0 - y as f32 / (height - 1).max(1) as f32;
            root.draw(&Rectangle::new(
                [(x0, y as i32), (x0 + bar as i32, y as i32 + 1)],
                ViridisRGB.get_color(v).filled(),
            ))?;
        }
        root.present()?;
        Ok(())
    };
    let result = draw()
        .map_err(|e| PlanFileError::io(path, std::io::Error::other(e.to_string())))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| PlanFileError::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moa::Rule;

    #[test]
    fn bytes_and_tables() {
        let mut p = Plan::uniform(2, 2, 0.5);
        p.rules[3] = Rule {
            alpha: 0.0,
            beta: 1.0,
        };
        // At 4096: spans 2048, 2048, 2048, 4096 -> 10240 rows of 8 dims, K+V f16.
        assert_eq!(kv_bytes(&p, 8, 4096), 10240 * 8 * 4);
        assert_eq!(dense_kv_bytes(&p, 8, 4096), 4 * 4096 * 8 * 4);
        let t = show_text(&p, 8, &[4096], 4096);
        assert!(t.contains("0.6250"), "{t}");
        assert!(t.contains("    1 2048 4096"), "{t}");
        let j = show_json(&p, 8, &[1000, 4096], 4096);
        assert_eq!(j["spans"]["rows"][1][1], 4096);
        assert_eq!(j["summary"][1]["kv_bytes"], 10240 * 32);
        // At 1000, spans are capped at N: 512, 512, 512, 1000.
        assert_eq!(j["summary"][0]["kv_bytes"], (3 * 512 + 1000) * 32);
    }

    #[test]
    fn heatmap_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.png");
        let mut p = Plan::uniform(3, 4, 0.25);
        p.rules[5] = Rule {
            alpha: 0.0,
            beta: 1.0,
        };
        write_heatmap_png(&p, 8192, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // Width and height from the IHDR chunk.
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (4 * CELL + CELL, 3 * CELL));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        let bad = dir.path().join("missing-dir/h.png");
        assert!(write_heatmap_png(&p, 8192, &bad).is_err());
    }
}
