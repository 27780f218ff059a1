//! The kernel timer: with `MOA_KERNEL_TIMES=1`, every kernel launch is bracketed by CUDA events
//! and the GPU time per kernel name is summed; the table goes to stderr when the process ends
//! (any tool: `MOA_KERNEL_TIMES=1 moa-bench ...`). CUDA graphs are off while it runs, so each
//! step's kernels launch one by one, and a kernel's time includes the gap before it when the
//! GPU waits for the host: small kernels read high, large ones are accurate. For exact figures
//! use Nsight Compute (`tools/gpu-check.sh profile`).
//!
//! Also here, for measuring what fusing kernels could gain: `MOA_SKIP_KERNELS=name,prefix*,...`
//! leaves out every launch of the kernels named (results are then wrong; timing only).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{CudaEvent, CudaFunction, CudaStream};

/// Events waiting to be read; read (and the GPU synchronized) when this many are pending.
const FLUSH_AT: usize = 2048;

#[derive(Default)]
struct State {
    names: HashMap<usize, String>,
    pending: Vec<(usize, CudaEvent, CudaEvent)>,
    /// Name -> (milliseconds, launches).
    totals: HashMap<String, (f64, u64)>,
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| {
        if enabled() {
            // Printed when the process exits normally.
            extern "C" fn report_at_exit() {
                report();
            }
            // SAFETY: registers a plain function with no arguments.
            unsafe { libc_atexit(report_at_exit) };
        }
        Mutex::new(State::default())
    })
}

extern "C" {
    #[link_name = "atexit"]
    fn libc_atexit(f: extern "C" fn()) -> i32;
}

/// Whether `MOA_KERNEL_TIMES=1`.
pub fn enabled() -> bool {
    static E: OnceLock<bool> = OnceLock::new();
    *E.get_or_init(|| std::env::var("MOA_KERNEL_TIMES").is_ok_and(|v| v == "1"))
}

/// The kernel names (or `prefix*`) of `MOA_SKIP_KERNELS`.
fn skip_list() -> &'static [String] {
    static L: OnceLock<Vec<String>> = OnceLock::new();
    L.get_or_init(|| {
        std::env::var("MOA_SKIP_KERNELS")
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether `MOA_SKIP_KERNELS` leaves out launches of `f` (a diagnostic: the step's results are
/// wrong then, its time tells what removing those kernels would gain).
pub fn skipped(f: &CudaFunction) -> bool {
    let list = skip_list();
    if list.is_empty() {
        return false;
    }
    let s = state().lock().unwrap_or_else(|e| e.into_inner());
    let Some(name) = s.names.get(&key(f)) else {
        return false;
    };
    list.iter().any(|p| pattern_matches(p, name))
}

/// A kernel name pattern: the exact name, or `prefix*`.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(pre) => name.starts_with(pre),
        None => name == pattern,
    }
}

fn key(f: &CudaFunction) -> usize {
    f.cu_function() as usize
}

/// Remembers a kernel's name (called when kernels are loaded).
pub fn name_kernel(f: &CudaFunction, name: &str) {
    if enabled() || !skip_list().is_empty() {
        let mut s = state().lock().unwrap_or_else(|e| e.into_inner());
        s.names.insert(key(f), name.to_string());
    }
}

/// An event recorded before a launch (None if events cannot be made).
pub fn start(stream: &CudaStream) -> Option<CudaEvent> {
    stream.record_event(Some(timing_flags())).ok()
}

fn timing_flags() -> cudarc::driver::sys::CUevent_flags {
    cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT
}

/// Records the end of `f`'s launch; reads finished events now and then.
pub fn stop(stream: &CudaStream, f: &CudaFunction, start: CudaEvent) {
    push(stream, key(f), start);
}

/// Records the end of work that is not one of our kernels (a cuBLAS call), under `name`.
pub fn stop_as(stream: &CudaStream, name: &'static str, start: CudaEvent) {
    let k = name.as_ptr() as usize;
    {
        let mut s = state().lock().unwrap_or_else(|e| e.into_inner());
        s.names.entry(k).or_insert_with(|| name.to_string());
    }
    push(stream, k, start);
}

fn push(stream: &CudaStream, k: usize, start: CudaEvent) {
    let Ok(end) = stream.record_event(Some(timing_flags())) else {
        return;
    };
    let mut s = state().lock().unwrap_or_else(|e| e.into_inner());
    s.pending.push((k, start, end));
    if s.pending.len() >= FLUSH_AT {
        flush(&mut s);
    }
}

fn flush(s: &mut State) {
    let pending = std::mem::take(&mut s.pending);
    for (k, a, b) in pending {
        if b.synchronize().is_err() {
            continue;
        }
        let ms = a.elapsed_ms(&b).unwrap_or(0.0) as f64;
        let name = s
            .names
            .get(&k)
            .cloned()
            .unwrap_or_else(|| format!("kernel@{k:x}"));
        let e = s.totals.entry(name).or_insert((0.0, 0));
        e.0 += ms;
        e.1 += 1;
    }
}

/// Drops every time summed so far (after flushing the pending events): tools call it where the
/// phase they report starts (moa-bench: before the generation steps), so the table holds that
/// phase only. A no-op when the timer is off.
pub fn reset() {
    if !enabled() {
        return;
    }
    let mut s = state().lock().unwrap_or_else(|e| e.into_inner());
    flush(&mut s);
    s.totals.clear();
}

/// Prints the per-kernel table (largest total first) to stderr.
pub fn report() {
    let mut s = state().lock().unwrap_or_else(|e| e.into_inner());
    flush(&mut s);
    let mut rows: Vec<_> = s
        .totals
        .iter()
        .map(|(n, &(ms, c))| (n.clone(), ms, c))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let all: f64 = rows.iter().map(|r| r.1).sum();
    eprintln!("kernel times (MOA_KERNEL_TIMES=1): {all:.3} ms in all");
    eprintln!(
        "{:>10} {:>6} {:>9} {:>10}  kernel",
        "ms", "%", "launches", "us/launch"
    );
    for (n, ms, c) in rows {
        eprintln!(
            "{ms:10.3} {:6.1} {c:9} {:10.2}  {n}",
            100.0 * ms / all.max(1e-9),
            1000.0 * ms / c.max(1) as f64
        );
    }
}

#[cfg(test)]
mod tests {
    use super::pattern_matches;

    #[test]
    fn skip_patterns_match_names_or_prefixes() {
        assert!(pattern_matches("rope_kv", "rope_kv"));
        assert!(!pattern_matches("rope_kv", "rope_kv2"));
        assert!(!pattern_matches("rope", "rope_kv"));
        assert!(pattern_matches("attn_dec*", "attn_dec_d128_k8v8"));
        assert!(!pattern_matches("attn_dec*", "attn_pre_d128"));
        assert!(pattern_matches("*", "anything"));
    }
}
