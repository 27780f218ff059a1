//! The profiling run over a calibration file: for each profiled length (shortest first), the
//! file's calibration records of that length bucket, in file order, each profiled and added to
//! the profile, which is saved (atomically) after every sample. A run that stops keeps every
//! finished sample; a later run with the same output, model, data and lengths resumes after the
//! samples the file already counts (samples are taken in a fixed order, so the count says
//! which).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::calib::{fnv1a, CalibRecord};
use super::{SampleError, SampleProfiler};
use crate::moa::profile_file::{ModelIdentity, Profile, ProfileError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("sample {id}: {source}")]
    Sample { id: String, source: SampleError },
    #[error("{path}: cannot resume: {reason} (remove the file or choose another -o)")]
    Resume { path: PathBuf, reason: String },
    #[error("no lengths to profile")]
    NoLengths,
    #[error("length {length}: {reason}")]
    BadLength { length: usize, reason: String },
    #[error("no calibration records for length {length} in {data} (buckets present: {present})")]
    NoRecords {
        length: usize,
        data: String,
        present: String,
    },
}

/// What a run is asked to do.
pub struct RunConfig {
    pub lengths: Vec<usize>,
    /// At most this many samples per length (all when `None`).
    pub per_length: Option<usize>,
    /// Name of the data file (for messages and provenance) and its bytes' fingerprint.
    pub data_name: String,
    pub data_fingerprint: u64,
    pub out: PathBuf,
}

/// Progress reports.
pub enum RunEvent<'a> {
    /// Before the first sample: samples already in the file and the total planned.
    Start { done: usize, total: usize },
    /// A sample is about to start.
    Begin {
        id: &'a str,
        length: usize,
        n_tokens: usize,
    },
    /// A sample finished and was saved.
    Done {
        id: &'a str,
        length: usize,
        n_tokens: usize,
        loss: f64,
        seconds: f64,
        done: usize,
        total: usize,
    },
}

/// Fingerprint of a data file's bytes.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    fnv1a(bytes)
}

fn provenance(cfg: &RunConfig, block: usize) -> String {
    format!(
        "moa-profile {}; data {} fnv1a {:016x}; split calib; block {block}",
        env!("CARGO_PKG_VERSION"),
        cfg.data_name,
        cfg.data_fingerprint
    )
}

/// The records profiled at `length`, in order.
fn plan_for(records: &[CalibRecord], length: usize, cap: Option<usize>) -> Vec<&CalibRecord> {
    records
        .iter()
        .filter(|r| r.split == "calib" && r.length == length)
        .take(cap.unwrap_or(usize::MAX))
        .collect()
}

/// Opens the output to resume, or starts a new profile.
fn open(cfg: &RunConfig, identity: &ModelIdentity, block: usize) -> Result<Profile, RunError> {
    let fresh = || {
        Profile::new(
            identity.clone(),
            block,
            &cfg.lengths,
            &provenance(cfg, block),
        )
    };
    if !cfg.out.exists() {
        return Ok(fresh());
    }
    let p = Profile::load(&cfg.out)?;
    let bad = |reason: String| RunError::Resume {
        path: cfg.out.clone(),
        reason,
    };
    if &p.header.model != identity {
        return Err(bad(format!(
            "it was made on model {:?} ({} layers, {} KV heads), this is {:?} ({} layers, {} KV heads)",
            p.header.model.name,
            p.header.model.n_layer,
            p.header.model.n_head_kv,
            identity.name,
            identity.n_layer,
            identity.n_head_kv
        )));
    }
    if p.header.block != block {
        return Err(bad(format!(
            "block {} differs from {block}",
            p.header.block
        )));
    }
    let lens: Vec<usize> = p.header.lengths.iter().map(|e| e.length).collect();
    if lens != cfg.lengths {
        return Err(bad(format!(
            "it profiles lengths {lens:?}, this run asks for {:?}",
            cfg.lengths
        )));
    }
    let tag = format!("fnv1a {:016x}", cfg.data_fingerprint);
    if !p.header.provenance.contains(&tag) {
        return Err(bad(format!(
            "it was made from other data ({:?}); this data is {} {tag}",
            p.header.provenance, cfg.data_name
        )));
    }
    Ok(p)
}

/// Runs (or resumes) the profile; returns it as saved.
pub fn run<P: SampleProfiler + ?Sized>(
    profiler: &P,
    identity: &ModelIdentity,
    records: &[CalibRecord],
    cfg: &RunConfig,
    mut on_event: impl FnMut(RunEvent),
) -> Result<Profile, RunError> {
    if cfg.lengths.is_empty() {
        return Err(RunError::NoLengths);
    }
    for (i, &l) in cfg.lengths.iter().enumerate() {
        if l == 0 || l > (1 << 24) {
            return Err(RunError::BadLength {
                length: l,
                reason: "must be in 1..=16777216".into(),
            });
        }
        if cfg.lengths[..i].contains(&l) {
            return Err(RunError::BadLength {
                length: l,
                reason: "given twice".into(),
            });
        }
    }
    let plans: Vec<Vec<&CalibRecord>> = cfg
        .lengths
        .iter()
        .map(|&l| plan_for(records, l, cfg.per_length))
        .collect();
    for (&length, p) in cfg.lengths.iter().zip(&plans) {
        if p.is_empty() {
            let mut present: Vec<usize> = records
                .iter()
                .filter(|r| r.split == "calib")
                .map(|r| r.length)
                .collect();
            present.sort();
            present.dedup();
            return Err(RunError::NoRecords {
                length,
                data: cfg.data_name.clone(),
                present: format!("{present:?}"),
            });
        }
    }
    let mut profile = open(cfg, identity, profiler.block())?;
    let total: usize = plans.iter().map(Vec::len).sum();
    let mut done: usize = profile
        .header
        .lengths
        .iter()
        .zip(&plans)
        .map(|(e, p)| e.samples.min(p.len()))
        .sum();
    on_event(RunEvent::Start { done, total });
    // Shortest length first, so early partial results cover every length quickly.
    let mut order: Vec<usize> = (0..cfg.lengths.len()).collect();
    order.sort_by_key(|&i| cfg.lengths[i]);
    for li in order {
        let length = cfg.lengths[li];
        let skip = profile.header.lengths[li].samples;
        for r in plans[li].iter().skip(skip) {
            on_event(RunEvent::Begin {
                id: &r.id,
                length,
                n_tokens: r.n_tokens,
            });
            let t0 = Instant::now();
            let res = profiler
                .profile_sample(&r.tokens, &r.response_ranges(), length, None)
                .map_err(|source| RunError::Sample {
                    id: r.id.clone(),
                    source,
                })?;
            res.influence.add_to(&mut profile, li)?;
            profile.save(&cfg.out)?;
            done += 1;
            on_event(RunEvent::Done {
                id: &r.id,
                length,
                n_tokens: r.n_tokens,
                loss: res.loss,
                seconds: t0.elapsed().as_secs_f64(),
                done,
                total,
            });
        }
    }
    Ok(profile)
}

/// Reads a data file and its fingerprint.
pub fn read_data(path: &Path) -> Result<(Vec<CalibRecord>, u64), super::calib::CalibError> {
    let bytes = std::fs::read(path).map_err(|source| super::calib::CalibError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let records = super::calib::read_jsonl(path)?;
    Ok((records, fingerprint(&bytes)))
}
