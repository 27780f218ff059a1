//! KV cache layout, independent of any backend: for each sequence, layer and KV head a region of
//! `C_h` rows (`head_dim` values each) holding `sink` always-kept leading tokens and a ring of the
//! most recent ones (../shared/docs/moa-method.md sections 2-3). Dense attention is the special
//! case `C_h = n_ctx` for every head. Backends allocate `rows_per_layer()` rows per layer for K
//! and for V and place tokens with [`KvLayout::slot`].

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
        })
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

    /// Bytes of K and V together at `elem_bytes` per value.
    pub fn bytes(&self, elem_bytes: usize) -> usize {
        2 * self.total_rows() * self.head_dim * elem_bytes
    }

    /// Bytes a dense cache of the same shape would take.
    pub fn dense_bytes(&self, elem_bytes: usize) -> usize {
        2 * self.n_seq * self.n_layer * self.n_head_kv * self.n_ctx * self.head_dim * elem_bytes
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
    j <= i && (j < sink || i - j < cap - sink)
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
        assert_eq!(l.bytes(2), l.dense_bytes(2));
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
