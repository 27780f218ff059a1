//! Splitting special tokens out of the text before tokenization (llama.cpp's
//! `tokenizer_st_partition`).
//!
//! The candidates are the control, user-defined and unknown tokens, longest text first (equal
//! lengths in the order llama.cpp's unstable sort leaves them, see [`sort_like_llama_cpp`]). Each
//! candidate in turn is searched in every piece of text still unsplit, left to right; each
//! occurrence becomes the token and splits the piece. Without `parse_special` only user-defined
//! tokens are candidates (they are split out even from plain text, as in Hugging Face
//! tokenizers). A token with the `LSTRIP` / `RSTRIP` attribute also swallows the ASCII whitespace
//! before / after it (llama.cpp sets these for a few models by name, e.g. Phi-3).
//!
//! Implemented here rather than with `tokenizers`' added-vocabulary matching: that one finds the
//! leftmost-longest match in a single pass, which differs from this longest-token-first order
//! when candidates overlap.

/// A piece of the input: text still to tokenize (a byte range of it) or a special token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(std::ops::Range<usize>),
    Token(u32),
}

/// A special token candidate.
#[derive(Debug, Clone)]
pub(crate) struct Special {
    pub id: u32,
    pub text: String,
    /// Matched only when `parse_special` (control and unknown tokens).
    pub needs_parse_special: bool,
    pub lstrip: bool,
    pub rstrip: bool,
}

/// C's `isspace` in the "C" locale, which llama.cpp uses for LSTRIP/RSTRIP.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// Splits `text` by the candidates (already ordered longest text first).
pub(crate) fn partition(text: &str, specials: &[Special], parse_special: bool) -> Vec<Fragment> {
    let bytes = text.as_bytes();
    let mut fragments = Vec::new();
    if !text.is_empty() {
        fragments.push(Fragment::Text(0..text.len()));
    }
    let mut next = Vec::new();
    for special in specials {
        if special.needs_parse_special && !parse_special {
            continue;
        }
        let needle = special.text.as_str();
        // Cheap rejection: most candidates do not occur at all.
        if !fragments
            .iter()
            .any(|f| matches!(f, Fragment::Text(r) if text[r.clone()].contains(needle)))
        {
            continue;
        }
        next.clear();
        for fragment in fragments.drain(..) {
            let Fragment::Text(range) = fragment else {
                next.push(fragment);
                continue;
            };
            let (mut start, end) = (range.start, range.end);
            while let Some(found) = text[start..end].find(needle) {
                let at = start + found;
                let mut left_end = at;
                if special.lstrip {
                    while left_end > start && is_c_space(bytes[left_end - 1]) {
                        left_end -= 1;
                    }
                }
                if left_end > start {
                    next.push(Fragment::Text(start..left_end));
                }
                next.push(Fragment::Token(special.id));
                start = at + needle.len();
                if special.rstrip {
                    while start < end && is_c_space(bytes[start]) {
                        start += 1;
                    }
                }
            }
            if start < end {
                next.push(Fragment::Text(start..end));
            }
        }
        std::mem::swap(&mut fragments, &mut next);
    }
    fragments
}

/// Orders the candidates longest text first, in the order llama.cpp ends up with.
///
/// llama.cpp sorts its id-ordered candidate list with `std::sort`, which is not stable: among
/// texts of equal length the resulting order is whatever the C++ library's introsort produces.
/// That order is visible when two equal-length candidates overlap in the text, or when one of
/// them strips whitespace that the other would match (e.g. `"\n\n"` and `"  "` in a model with
/// RSTRIP). To give the same tokens as the reference (llama.cpp built with GCC's libstdc++ on
/// Linux), this is an independent implementation of that introsort's steps: median-of-three
/// quicksort down to runs of 16 with a depth limit of 2·log2(n) (heapsort beyond it), then one
/// insertion sort pass.
pub(crate) fn sort_like_llama_cpp<T>(items: &mut [T], text_len: impl Fn(&T) -> usize) {
    let before = |a: &T, b: &T| text_len(a) > text_len(b);
    introsort(items, &before);
}

const THRESHOLD: usize = 16;

fn introsort<T>(v: &mut [T], less: &impl Fn(&T, &T) -> bool) {
    let n = v.len();
    if n < 2 {
        return;
    }
    let depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    introsort_loop(v, depth, less);
    if n > THRESHOLD {
        insertion_sort(&mut v[..THRESHOLD], less);
        for i in THRESHOLD..n {
            unguarded_linear_insert(v, i, less);
        }
    } else {
        insertion_sort(v, less);
    }
}

fn introsort_loop<T>(v: &mut [T], mut depth: usize, less: &impl Fn(&T, &T) -> bool) {
    let mut end = v.len();
    while end > THRESHOLD {
        if depth == 0 {
            heap_sort(&mut v[..end], less);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(&mut v[..end], less);
        introsort_loop(&mut v[cut..end], depth, less);
        end = cut;
    }
}

/// Moves the median of `v[1]`, `v[mid]`, `v[last]` to `v[0]`, then partitions `v[1..]` around it.
fn partition_pivot<T>(v: &mut [T], less: &impl Fn(&T, &T) -> bool) -> usize {
    let (len, mid) = (v.len(), v.len() / 2);
    let (a, b, c) = (1, mid, len - 1);
    let median = if less(&v[a], &v[b]) {
        if less(&v[b], &v[c]) {
            b
        } else if less(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if less(&v[a], &v[c]) {
        a
    } else if less(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(0, median);
    // Unguarded partition of v[1..] around the pivot v[0].
    let (mut first, mut last) = (1, len);
    loop {
        while less(&v[first], &v[0]) {
            first += 1;
        }
        last -= 1;
        while less(&v[0], &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

fn insertion_sort<T>(v: &mut [T], less: &impl Fn(&T, &T) -> bool) {
    for i in 1..v.len() {
        if less(&v[i], &v[0]) {
            v[..=i].rotate_right(1);
        } else {
            unguarded_linear_insert(v, i, less);
        }
    }
}

/// Moves `v[i]` left past every element it belongs before (some element to its left stops it).
fn unguarded_linear_insert<T>(v: &mut [T], mut i: usize, less: &impl Fn(&T, &T) -> bool) {
    while less(&v[i], &v[i - 1]) {
        v.swap(i, i - 1);
        i -= 1;
    }
}

fn heap_sort<T>(v: &mut [T], less: &impl Fn(&T, &T) -> bool) {
    let len = v.len();
    if len < 2 {
        return;
    }
    // Build the heap.
    let mut parent = (len - 2) / 2;
    loop {
        adjust_heap(v, parent, len, less);
        if parent == 0 {
            break;
        }
        parent -= 1;
    }
    // Pop the maximum to the end, one at a time.
    let mut end = len;
    while end > 1 {
        end -= 1;
        // The element at `end` becomes the value sifted down from the root.
        v.swap(0, end);
        // `adjust_heap` sifts the hole at 0 down, then pushes the value back up: with the value
        // temporarily at the root this is the same sequence of moves.
        adjust_heap(v, 0, end, less);
    }
}

/// Sifts the value at `hole` down to a leaf along the larger children, then back up to its place
/// (the "hole" technique of the C++ library's heap operations, with swaps).
fn adjust_heap<T>(v: &mut [T], mut hole: usize, len: usize, less: &impl Fn(&T, &T) -> bool) {
    let top = hole;
    let mut child = hole;
    while child < len.saturating_sub(1) / 2 {
        child = 2 * (child + 1);
        if less(&v[child], &v[child - 1]) {
            child -= 1;
        }
        v.swap(hole, child);
        hole = child;
    }
    if len & 1 == 0 && len >= 2 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v.swap(hole, child - 1);
        hole = child - 1;
    }
    // Push the value (now at `hole`) up while its parent is smaller.
    while hole > top {
        let parent = (hole - 1) / 2;
        if !less(&v[parent], &v[hole]) {
            break;
        }
        v.swap(hole, parent);
        hole = parent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(id: u32, text: &str, parse: bool) -> Special {
        Special {
            id,
            text: text.into(),
            needs_parse_special: parse,
            lstrip: false,
            rstrip: false,
        }
    }

    fn show(text: &str, f: &[Fragment]) -> Vec<String> {
        f.iter()
            .map(|f| match f {
                Fragment::Text(r) => text[r.clone()].to_string(),
                Fragment::Token(id) => format!("#{id}"),
            })
            .collect()
    }

    #[test]
    fn splits_longest_first() {
        let specials = [
            sp(1, "<|im_end|>", true),
            sp(2, "<s>", false),
            sp(3, "\n", false),
        ];
        let text = "a<|im_end|>\nb<s><s>c";
        assert_eq!(
            show(text, &partition(text, &specials, true)),
            ["a", "#1", "#3", "b", "#2", "#2", "c"]
        );
        assert_eq!(
            show(text, &partition(text, &specials, false)),
            ["a<|im_end|>", "#3", "b", "#2", "#2", "c"]
        );
        assert!(partition("", &specials, true).is_empty());
    }

    #[test]
    fn order_decides_overlaps() {
        // Candidates come longest first: "abc" takes the "c" that "cd" would have used.
        let specials = [sp(1, "abc", true), sp(2, "cd", true)];
        let text = "abcd";
        assert_eq!(show(text, &partition(text, &specials, true)), ["#1", "d"]);
    }

    #[test]
    fn strips_whitespace() {
        let mut end = sp(7, "<|end|>", true);
        end.rstrip = true;
        end.lstrip = true;
        let text = "x \n<|end|>  \ty <|end|>";
        assert_eq!(
            show(text, &partition(text, &[end], true)),
            ["x", "#7", "y", "#7"]
        );
    }

    #[test]
    fn introsort_orders_by_length() {
        for n in [0usize, 1, 2, 5, 16, 17, 40, 100, 1000] {
            let mut v: Vec<(usize, usize)> = (0..n).map(|i| ((i * 7919) % 13, i)).collect();
            sort_like_llama_cpp(&mut v, |x| x.0);
            assert!(v.windows(2).all(|w| w[0].0 >= w[1].0), "n={n}");
            let mut ids: Vec<usize> = v.iter().map(|x| x.1).collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..n).collect::<Vec<_>>());
        }
        // The heapsort fallback on its own.
        let mut v: Vec<usize> = (0..100).map(|i| (i * 37) % 11).collect();
        heap_sort(&mut v, &|a: &usize, b: &usize| a < b);
        assert!(v.windows(2).all(|w| w[0] <= w[1]));
    }
}
