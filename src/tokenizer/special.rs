//! Splitting special tokens out of the text before tokenization (llama.cpp's
//! `tokenizer_st_partition`).
//!
//! The candidates are the control, user-defined and unknown tokens, longest text first. Each
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
        let specials = [sp(1, "<|im_end|>", true), sp(2, "<s>", false), sp(3, "\n", false)];
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
}
