//! KV cache layout, independent of any backend: for each sequence, layer and KV head a region of
//! `C_h` rows (`head_dim` values each) holding `sink` always-kept leading tokens and a ring of the
//! most recent ones (../shared/docs/moa-method.md sections 2-3). Dense attention is the special
//! case `C_h = n_ctx` for every head. Backends allocate `rows_per_layer()` rows per layer for K
//! and for V and place tokens with [`KvLayout::slot`]. The layout also fixes how a row is stored
//! ([`KvType`]: f16, or ggml's q8_0 blocks), so [`KvLayout::bytes`] is the exact allocation.

/// How one K or V row of `head_dim` values is stored in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvType {
    /// IEEE half precision, 2 bytes per value (llama.cpp's default).
    #[default]
    F16,
    /// ggml's Q8_0 blocks: per 32 values an f16 scale `d = amax / 127` and 32 int8 quants
    /// (34 bytes per 32 values); `head_dim` must be a multiple of 32.
    Q8_0,
}

/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;
/// Bytes per Q8_0 block (f16 scale + 32 int8).
pub const Q8_0_BLOCK_BYTES: usize = 34;

impl KvType {
    /// Every type, in the order the flags list them.
    pub const ALL: [KvType; 2] = [KvType::F16, KvType::Q8_0];

    /// llama.cpp's name (`-ctk` / `-ctv` values).
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Bytes of `n` values (`n` a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            KvType::F16 => 2 * n,
            KvType::Q8_0 => n / Q8_0_BLOCK * Q8_0_BLOCK_BYTES,
        }
    }

    /// Values per block: rows must hold a whole number of blocks.
    pub fn block(self) -> usize {
        match self {
            KvType::F16 => 1,
            KvType::Q8_0 => Q8_0_BLOCK,
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown KV cache type name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown KV cache type {0:?}: accepted types are f16, q8_0")]
pub struct UnknownKvType(pub String);

impl std::str::FromStr for KvType {
    type Err = UnknownKvType;
    fn from_str(s: &str) -> Result<KvType, UnknownKvType> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownKvType(s.to_string()))
    }
}

/// The element types of the K and of the V cache (they may differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KvTypes {
    pub k: KvType,
    pub v: KvType,
}

impl KvTypes {
    /// Both K and V of type `t`.
    pub fn both(t: KvType) -> KvTypes {
        KvTypes { k: t, v: t }
    }

    /// Bytes of one K row plus one V row of `head_dim` values.
    pub fn row_pair_bytes(self, head_dim: usize) -> usize {
        self.k.bytes_for(head_dim) + self.v.bytes_for(head_dim)
    }
}

impl std::fmt::Display for KvTypes {
    /// `f16` when both are equal, else `K q8_0, V f16`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.k == self.v {
            write!(f, "{}", self.k)
        } else {
            write!(f, "K {}, V {}", self.k, self.v)
        }
    }
}

/// Where each head's tokens live and which keys a query may see.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayout {
    pub n_seq: usize,
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Leading tokens that are always visible and always kept.
    pub sink: usize,
    /// The planned sequence length N every capacity was computed for (positions are < N).
    pub n_ctx: usize,
    /// `C_h` per `(layer, kv_head)`, index `layer * n_head_kv + head`; each `> sink` or `>= n_ctx`.
    caps: Vec<usize>,
    /// Row offset of each `(layer, head)` region within one sequence's part of a layer buffer.
    offsets: Vec<usize>,
    /// Rows one sequence occupies in each layer: `sum_h C_h` (same for every sequence).
    rows_per_seq_layer: Vec<usize>,
    /// How K and V rows are stored (f16 unless [`KvLayout::with_types`] says otherwise).
    types: KvTypes,
}

/// Errors in a cache layout request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvError {
    #[error("capacity table has {found} entries, the model needs {expected} (layers x KV heads)")]
    WrongShape { expected: usize, found: usize },
    #[error("layer {layer} head {head}: capacity {cap} must exceed the {sink} sink tokens (or cover the whole context)")]
    TooSmall {
        layer: usize,
        head: usize,
        cap: usize,
        sink: usize,
    },
    #[error("a {ty} KV cache stores rows in blocks of {block} values; head_dim {head_dim} is not a multiple")]
    HeadDimNotBlocks {
        ty: KvType,
        block: usize,
        head_dim: usize,
    },
}

impl KvLayout {
    /// Dense attention: every head keeps all `n_ctx` tokens.
    pub fn dense(
        n_seq: usize,
        n_layer: usize,
        n_head_kv: usize,
        head_dim: usize,
        n_ctx: usize,
    ) -> KvLayout {
        Self::with_capacities(
            n_seq,
            n_layer,
            n_head_kv,
            head_dim,
            n_ctx,
            0,
            vec![n_ctx; n_layer * n_head_kv],
        )
        .expect("dense layout is valid")
    }

    /// A layout with per-head capacities (clamped to `n_ctx`).
    pub fn with_capacities(
        n_seq: usize,
        n_layer: usize,
        n_head_kv: usize,
        head_dim: usize,
        n_ctx: usize,
        sink: usize,
        caps: Vec<usize>,
    ) -> Result<KvLayout, KvError> {
        if caps.len() != n_layer * n_head_kv {
            return Err(KvError::WrongShape {
                expected: n_layer * n_head_kv,
                found: caps.len(),
            });
        }
        let caps: Vec<usize> = caps.into_iter().map(|c| c.min(n_ctx)).collect();
        for (i, &cap) in caps.iter().enumerate() {
            if cap < n_ctx && cap <= sink {
                return Err(KvError::TooSmall {
                    layer: i / n_head_kv,
                    head: i % n_head_kv,
                    cap,
                    sink,
                });
            }
        }
        let mut offsets = Vec::with_capacity(caps.len());
        let mut rows_per_seq_layer = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let mut off = 0;
            for h in 0..n_head_kv {
                offsets.push(off);
                off += caps[l * n_head_kv + h];
            }
            rows_per_seq_layer.push(off);
        }
        Ok(KvLayout {
            n_seq,
            n_layer,
            n_head_kv,
            head_dim,
            sink,
            n_ctx,
            caps,
            offsets,
            rows_per_seq_layer,
            types: KvTypes::default(),
        })
    }

    /// The same layout with K and V rows stored as `types`.
    pub fn with_types(mut self, types: KvTypes) -> Result<KvLayout, KvError> {
        for ty in [types.k, types.v] {
            if !self.head_dim.is_multiple_of(ty.block()) {
                return Err(KvError::HeadDimNotBlocks {
                    ty,
                    block: ty.block(),
                    head_dim: self.head_dim,
                });
            }
        }
        self.types = types;
        Ok(self)
    }

    /// How K and V rows are stored.
    pub fn types(&self) -> KvTypes {
        self.types
    }

    /// `C_h` of a head.
    pub fn capacity(&self, layer: usize, head: usize) -> usize {
        self.caps[layer * self.n_head_kv + head]
    }

    /// Rows of one layer's K (or V) buffer across all sequences.
    pub fn rows_per_layer(&self, layer: usize) -> usize {
        self.rows_per_seq_layer[layer] * self.n_seq
    }

    /// First row of a head's region in its layer buffer.
    pub fn region_offset(&self, seq: usize, layer: usize, head: usize) -> usize {
        seq * self.rows_per_seq_layer[layer] + self.offsets[layer * self.n_head_kv + head]
    }

    /// Slot (row within the region) of the token at absolute position `pos`.
    pub fn slot(&self, layer: usize, head: usize, pos: usize) -> usize {
        ring_slot(self.capacity(layer, head), self.sink, pos)
    }

    /// Slots filled once `n_tokens` tokens were written: always a prefix of the region.
    pub fn filled(&self, layer: usize, head: usize, n_tokens: usize) -> usize {
        n_tokens.min(self.capacity(layer, head))
    }

    /// Total rows over all layers and sequences (K and V each).
    pub fn total_rows(&self) -> usize {
        (0..self.n_layer).map(|l| self.rows_per_layer(l)).sum()
    }

    /// Bytes of K and V together, exactly as allocated in the layout's [`KvTypes`].
    pub fn bytes(&self) -> usize {
        self.total_rows() * self.types.row_pair_bytes(self.head_dim)
    }

    /// Bytes a dense cache of the same shape and types would take.
    pub fn dense_bytes(&self) -> usize {
        self.n_seq
            * self.n_layer
            * self.n_head_kv
            * self.n_ctx
            * self.types.row_pair_bytes(self.head_dim)
    }
}

/// Ring placement: positions below `sink` keep their own slot; later ones cycle through the rest.
pub fn ring_slot(cap: usize, sink: usize, pos: usize) -> usize {
    if pos < sink || cap <= sink {
        pos
    } else {
        sink + (pos - sink) % (cap - sink)
    }
}

/// The token-exact span mask: may the query at position `i` see the key at position `j` in a
/// head of capacity `cap` (window `cap - sink`)?
#[inline]
pub fn visible(cap: usize, sink: usize, i: usize, j: usize) -> bool {
    j <= i && (j < sink || i - j < cap.saturating_sub(sink))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_layout_is_plain_causal() {
        let l = KvLayout::dense(2, 3, 2, 8, 100);
        assert_eq!(l.rows_per_layer(0), 2 * 2 * 100);
        assert_eq!(l.region_offset(1, 2, 1), 200 + 100);
        for p in 0..100 {
            assert_eq!(l.slot(0, 0, p), p);
        }
        for i in 0..100 {
            for j in 0..100 {
                assert_eq!(visible(100, 0, i, j), j <= i);
            }
        }
        assert_eq!(l.bytes(), l.dense_bytes());
        assert_eq!(l.bytes(), 2 * 2 * 3 * 2 * 100 * 8 * 2);
    }

    #[test]
    fn q8_0_rows_take_34_bytes_per_32_values() {
        let caps = vec![100, 40, 100, 60];
        let l = KvLayout::with_capacities(2, 2, 2, 64, 100, 4, caps).unwrap();
        let rows = 2 * (100 + 40 + 100 + 60);
        assert_eq!(l.bytes(), rows * 64 * 2 * 2);
        let q = l.clone().with_types(KvTypes::both(KvType::Q8_0)).unwrap();
        assert_eq!(q.bytes(), rows * (64 / 32) * 34 * 2);
        assert_eq!(q.dense_bytes(), 2 * 2 * 2 * 100 * 2 * 34 * 2);
        let mixed = KvTypes {
            k: KvType::Q8_0,
            v: KvType::F16,
        };
        let m = l.clone().with_types(mixed).unwrap();
        assert_eq!(m.bytes(), rows * (2 * 34 + 64 * 2));
        assert_eq!(mixed.to_string(), "K q8_0, V f16");
        assert!(matches!(
            KvLayout::dense(1, 1, 1, 48, 10).with_types(KvTypes::both(KvType::Q8_0)),
            Err(KvError::HeadDimNotBlocks { head_dim: 48, .. })
        ));
    }

    #[test]
    fn kv_type_names_parse() {
        assert_eq!("q8_0".parse::<KvType>(), Ok(KvType::Q8_0));
        assert_eq!("f16".parse::<KvType>(), Ok(KvType::F16));
        let e = "q4_0".parse::<KvType>().unwrap_err().to_string();
        assert!(e.contains("q4_0") && e.contains("f16, q8_0"), "{e}");
    }

    #[test]
    fn ring_keeps_sinks_and_recent_tokens() {
        // cap 6 with 2 sinks: positions 0,1 fixed, then a ring of 4.
        let slots: Vec<usize> = (0..12).map(|p| ring_slot(6, 2, p)).collect();
        assert_eq!(slots, [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3]);
        // After 12 tokens, the ring holds positions 8..11, and query 11 sees 0, 1, 8..11.
        let seen: Vec<usize> = (0..12).filter(|&j| visible(6, 2, 11, j)).collect();
        assert_eq!(seen, [0, 1, 8, 9, 10, 11]);
    }

    #[test]
    fn bad_capacities_are_errors() {
        assert!(matches!(
            KvLayout::with_capacities(1, 2, 2, 8, 100, 4, vec![50; 3]),
            Err(KvError::WrongShape {
                expected: 4,
                found: 3
            })
        ));
        assert!(matches!(
            KvLayout::with_capacities(1, 1, 2, 8, 100, 4, vec![50, 4]),
            Err(KvError::TooSmall {
                layer: 0,
                head: 1,
                ..
            })
        ));
    }
}
