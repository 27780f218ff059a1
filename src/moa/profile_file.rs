//! The profile file: attention influence summed over 64x64 (query, key) blocks, per profiled
//! length, layer and KV head, written by `moa-profile` and read by `moa-optimize`.
//!
//! Layout (all integers and floats little-endian):
//!
//! ```text
//! 8 bytes   magic "MOAPROF\0"
//! u32       format version (1)
//! u32       header length H in bytes
//! H bytes   header, UTF-8 JSON (ProfileHeader: model identity and shape, block size, lengths,
//!           sample counts per length)
//! then for each length in header order, for each layer, for each KV head:
//!           nb*(nb+1)/2 f32 values, nb = ceil(length / block): the lower-triangular block matrix
//!           packed row by row (query block qb, key blocks 0..=qb), index qb*(qb+1)/2 + kb.
//! ```
//!
//! Values are *sums* over the samples counted in the header (not means), so a resumed run adds
//! to them; [`Profile::mean`] divides. A length with zero samples has all-zero sums.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::util::AtomicFile;

pub const PROFILE_MAGIC: &[u8; 8] = b"MOAPROF\0";
pub const PROFILE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a moa profile file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: profile format version {found} is not supported (this build reads {PROFILE_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated: {what} needs {need} bytes, {have} left")]
    Truncated {
        path: PathBuf,
        what: String,
        need: usize,
        have: usize,
    },
    #[error("{path}: bad header: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error("{path}: {extra} bytes after the last block matrix")]
    Trailing { path: PathBuf, extra: usize },
    #[error("profile shape mismatch: {0}")]
    Shape(String),
}

/// Which model a profile was measured on; `moa-optimize` checks it against the model it plans for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// `general.name` (empty when absent).
    pub name: String,
    pub arch: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ctx_train: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthEntry {
    /// Sequence length in tokens the samples were truncated or padded to.
    pub length: usize,
    /// How many calibration samples are summed into this length's matrices.
    pub samples: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileHeader {
    pub model: ModelIdentity,
    /// Block edge in tokens (64).
    pub block: usize,
    pub lengths: Vec<LengthEntry>,
    /// Free-form provenance (data file, tool version, ...).
    #[serde(default)]
    pub provenance: String,
}

/// A whole profile in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub header: ProfileHeader,
    /// One vector per length (header order): layers x KV heads x packed blocks.
    pub sums: Vec<Vec<f32>>,
}

/// Number of blocks along one side for `length` tokens.
pub fn blocks_per_side(length: usize, block: usize) -> usize {
    length.div_ceil(block)
}

/// Packed size of a lower-triangular nb x nb block matrix.
pub fn packed_len(nb: usize) -> usize {
    nb * (nb + 1) / 2
}

/// Index of block (qb, kb), kb <= qb, in the packed matrix.
pub fn packed_index(qb: usize, kb: usize) -> usize {
    debug_assert!(kb <= qb);
    qb * (qb + 1) / 2 + kb
}

impl Profile {
    /// An all-zero profile for the given lengths.
    pub fn new(model: ModelIdentity, block: usize, lengths: &[usize], provenance: &str) -> Profile {
        let header = ProfileHeader {
            block,
            lengths: lengths
                .iter()
                .map(|&length| LengthEntry { length, samples: 0 })
                .collect(),
            provenance: provenance.to_string(),
            model,
        };
        let sums = lengths
            .iter()
            .map(|&n| vec![0.0; header.per_head(n) * header.heads()])
            .collect();
        Profile { header, sums }
    }

    /// Adds `other`'s sums and sample counts into this profile: the result is the profile of
    /// both calibration sets together (a record profiled in both counts twice, so merging a
    /// profile of a subset weighs that subset double). Model, block and lengths must agree.
    pub fn merge(&mut self, other: &Profile) -> Result<(), String> {
        let (a, b) = (&self.header, &other.header);
        if a.model != b.model {
            return Err(format!(
                "models differ: {:?} vs {:?}",
                a.model.name, b.model.name
            ));
        }
        if a.block != b.block {
            return Err(format!("blocks differ: {} vs {}", a.block, b.block));
        }
        let la: Vec<usize> = a.lengths.iter().map(|e| e.length).collect();
        let lb: Vec<usize> = b.lengths.iter().map(|e| e.length).collect();
        if la != lb {
            return Err(format!("lengths differ: {la:?} vs {lb:?}"));
        }
        for (li, e) in self.header.lengths.iter_mut().enumerate() {
            e.samples += other.header.lengths[li].samples;
            for (x, y) in self.sums[li].iter_mut().zip(&other.sums[li]) {
                *x += *y;
            }
        }
        self.header.provenance =
            format!("{} + {}", self.header.provenance, other.header.provenance);
        Ok(())
    }

    /// Summed influence of all heads at length index `li` (over all samples).
    pub fn total(&self, li: usize) -> f64 {
        self.sums[li].iter().map(|&v| v as f64).sum()
    }

    /// Like [`Profile::merge`], but `other`'s sums are first scaled at every length so that its
    /// summed influence is `share` times this profile's: a profile of a small, differently
    /// scaled calibration set (e.g. the loss on a few answer tokens) then weighs `share` times
    /// this one in the optimizer's per-length objective (the fraction of the total), whatever
    /// its sample count or loss scale. A length where either total is zero is added unscaled.
    pub fn merge_balanced(&mut self, other: &Profile, share: f64) -> Result<(), String> {
        if !(share >= 0.0 && share.is_finite()) {
            return Err(format!("share {share} must be finite and >= 0"));
        }
        let mut o = other.clone();
        for li in 0..o.sums.len().min(self.sums.len()) {
            let (a, b) = (self.total(li), o.total(li));
            if a > 0.0 && b > 0.0 {
                let f = (share * a / b) as f32;
                o.sums[li].iter_mut().for_each(|v| *v *= f);
            }
        }
        self.merge(&o)?;
        Ok(())
    }

    /// Position of `length` in the header, if profiled.
    pub fn length_index(&self, length: usize) -> Option<usize> {
        self.header.lengths.iter().position(|e| e.length == length)
    }

    /// The summed packed block matrix of one head at length index `li`.
    pub fn head_sums(&self, li: usize, layer: usize, head: usize) -> &[f32] {
        let n = self.header.per_head(self.header.lengths[li].length);
        let h = layer * self.header.model.n_head_kv + head;
        &self.sums[li][h * n..(h + 1) * n]
    }

    pub fn head_sums_mut(&mut self, li: usize, layer: usize, head: usize) -> &mut [f32] {
        let n = self.header.per_head(self.header.lengths[li].length);
        let h = layer * self.header.model.n_head_kv + head;
        &mut self.sums[li][h * n..(h + 1) * n]
    }

    /// The mean packed block matrix of one head (sums / samples; zeros when no samples).
    pub fn mean(&self, li: usize, layer: usize, head: usize) -> Vec<f32> {
        let s = self.header.lengths[li].samples;
        let k = if s == 0 { 0.0 } else { 1.0 / s as f32 };
        self.head_sums(li, layer, head)
            .iter()
            .map(|v| v * k)
            .collect()
    }

    /// Writes the file atomically (temp file beside `path`, sync, rename).
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let io = |source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        };
        for (li, e) in self.header.lengths.iter().enumerate() {
            let want = self.header.per_head(e.length) * self.header.heads();
            if self.sums[li].len() != want {
                return Err(ProfileError::Shape(format!(
                    "length {} holds {} values, its shape needs {want}",
                    e.length,
                    self.sums[li].len()
                )));
            }
        }
        let header = serde_json::to_vec(&self.header).expect("header serializes");
        let mut f = AtomicFile::create(path).map_err(io)?;
        let w = f.writer();
        w.write_all(PROFILE_MAGIC).map_err(io)?;
        w.write_all(&PROFILE_VERSION.to_le_bytes()).map_err(io)?;
        w.write_all(&(header.len() as u32).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for m in &self.sums {
            let mut buf = Vec::with_capacity(m.len() * 4);
            for v in m {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&buf).map_err(io)?;
        }
        f.commit().map_err(io)
    }

    /// Reads and validates a profile file.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let bytes = std::fs::read(path).map_err(|source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Profile::from_bytes(&bytes, path)
    }

    /// Parses a profile from bytes; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Profile, ProfileError> {
        let p = || path.to_path_buf();
        let mut at = 0usize;
        let mut take = |n: usize, what: &str| -> Result<&[u8], ProfileError> {
            let have = bytes.len() - at;
            if n > have {
                return Err(ProfileError::Truncated {
                    path: p(),
                    what: what.to_string(),
                    need: n,
                    have,
                });
            }
            let s = &bytes[at..at + n];
            at += n;
            Ok(s)
        };
        if take(8, "magic")? != PROFILE_MAGIC {
            return Err(ProfileError::BadMagic { path: p() });
        }
        let version = u32::from_le_bytes(take(4, "version")?.try_into().unwrap());
        if version != PROFILE_VERSION {
            return Err(ProfileError::Version {
                path: p(),
                found: version,
            });
        }
        let hlen = u32::from_le_bytes(take(4, "header length")?.try_into().unwrap()) as usize;
        let header: ProfileHeader =
            serde_json::from_slice(take(hlen, "header")?).map_err(|e| ProfileError::Header {
                path: p(),
                reason: e.to_string(),
            })?;
        let bad = |reason: String| ProfileError::Header { path: p(), reason };
        if header.block == 0 {
            return Err(bad("block size 0".into()));
        }
        if header.model.n_layer == 0 || header.model.n_head_kv == 0 {
            return Err(bad("model shape has no layers or no KV heads".into()));
        }
        if header.lengths.is_empty() {
            return Err(bad("no profiled lengths".into()));
        }
        // Refuse shapes whose payload could not fit in the file before allocating for them.
        let mut total: usize = 0;
        for e in &header.lengths {
            if e.length == 0 || e.length > (1 << 24) {
                return Err(bad(format!("implausible length {}", e.length)));
            }
            let n = header
                .per_head(e.length)
                .checked_mul(header.heads())
                .and_then(|v| v.checked_mul(4))
                .ok_or_else(|| bad("payload size overflows".into()))?;
            total = total
                .checked_add(n)
                .ok_or_else(|| bad("payload size overflows".into()))?;
        }
        let data = &bytes[16 + hlen..];
        let rest = data.len();
        if total > rest {
            return Err(ProfileError::Truncated {
                path: p(),
                what: "block matrices".into(),
                need: total,
                have: rest,
            });
        }
        if total < rest {
            return Err(ProfileError::Trailing {
                path: p(),
                extra: rest - total,
            });
        }
        let mut sums = Vec::with_capacity(header.lengths.len());
        let mut off = 0;
        for e in &header.lengths {
            let n = header.per_head(e.length) * header.heads();
            let raw = &data[off..off + n * 4];
            off += n * 4;
            sums.push(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            );
        }
        Ok(Profile { header, sums })
    }
}

impl ProfileHeader {
    /// Layers x KV heads.
    pub fn heads(&self) -> usize {
        self.model.n_layer * self.model.n_head_kv
    }

    /// Packed values per head at `length`.
    pub fn per_head(&self, length: usize) -> usize {
        packed_len(blocks_per_side(length, self.block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> ModelIdentity {
        ModelIdentity {
            name: "t".into(),
            arch: "llama".into(),
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 8,
            n_ctx_train: 256,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.bin");
        let mut p = Profile::new(identity(), 64, &[100, 256], "test");
        p.header.lengths[1].samples = 2;
        for (i, v) in p.head_sums_mut(1, 1, 1).iter_mut().enumerate() {
            *v = i as f32;
        }
        p.save(&path).unwrap();
        let q = Profile::load(&path).unwrap();
        assert_eq!(p, q);
        assert_eq!(q.head_sums(0, 0, 0).len(), 3); // nb = 2
        assert_eq!(q.mean(1, 1, 1)[packed_index(3, 1)], (6 + 1) as f32 / 2.0);
        let bytes = std::fs::read(&path).unwrap();
        let e = Profile::from_bytes(&bytes[..bytes.len() - 3], &path).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut more = bytes.clone();
        more.push(0);
        assert!(Profile::from_bytes(&more, &path)
            .unwrap_err()
            .to_string()
            .contains("after the last"));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(Profile::from_bytes(&bad, &path)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }

    #[test]
    fn merge_balanced_scales_the_other_to_a_share_of_the_total() {
        let mut a = Profile::new(identity(), 64, &[128, 256], "a");
        let mut b = Profile::new(identity(), 64, &[128, 256], "b");
        for li in 0..2 {
            for (k, v) in a.sums[li].iter_mut().enumerate() {
                *v = 1.0 + k as f32;
            }
            for (k, v) in b.sums[li].iter_mut().enumerate() {
                *v = 0.01 * (k % 3) as f32;
            }
            a.header.lengths[li].samples = 4;
            b.header.lengths[li].samples = 1;
        }
        let (ta, tb) = ([a.total(0), a.total(1)], [b.total(0), b.total(1)]);
        let mut m = a.clone();
        m.merge_balanced(&b, 0.5).unwrap();
        for li in 0..2 {
            assert_eq!(m.header.lengths[li].samples, 5);
            // The other's part is half of the first profile's total, its shape unchanged.
            assert!((m.total(li) - 1.5 * ta[li]).abs() < 1e-3 * ta[li]);
            for k in 0..m.sums[li].len() {
                let want = a.sums[li][k] as f64 + 0.5 * ta[li] / tb[li] * b.sums[li][k] as f64;
                assert!((m.sums[li][k] as f64 - want).abs() < 1e-4 * want.max(1.0));
            }
        }
        assert!(a.clone().merge_balanced(&b, -1.0).is_err());
        assert!(a.clone().merge_balanced(&b, f64::NAN).is_err());
    }

    #[test]
    fn merge_adds_sums_and_samples() {
        let mut a = Profile::new(identity(), 64, &[100, 256], "a");
        let mut b = Profile::new(identity(), 64, &[100, 256], "b");
        a.header.lengths[1].samples = 2;
        b.header.lengths[1].samples = 1;
        a.head_sums_mut(1, 0, 1)[4] = 3.0;
        b.head_sums_mut(1, 0, 1)[4] = 1.5;
        a.merge(&b).unwrap();
        assert_eq!(a.header.lengths[1].samples, 3);
        assert_eq!(a.head_sums(1, 0, 1)[4], 4.5);
        assert_eq!(a.mean(1, 0, 1)[4], 1.5);
        assert_eq!(a.header.provenance, "a + b");
        let c = Profile::new(identity(), 64, &[100], "c");
        assert!(a.merge(&c).unwrap_err().contains("lengths differ"));
        let d = Profile::new(identity(), 32, &[100, 256], "d");
        assert!(a.merge(&d).unwrap_err().contains("blocks differ"));
    }
}
