//! Character classes and the GPT-2 byte-level alphabet, with the definitions llama.cpp uses.
//!
//! llama.cpp classifies code points with tables generated from Python's `regex` module:
//! `\p{L}` (letter), `\p{N}` (number) and `\s` (the Unicode `White_Space` property). We take the
//! same three classes from the Unicode tables that ship with Rust: `\p{L}` from `regex-syntax`
//! (already compiled in through `tokenizers`), `\p{N}` from [`char::is_numeric`] (general
//! categories Nd, Nl, No) and `\s` from [`char::is_whitespace`] (`White_Space`). The only possible
//! differences are code points assigned in a newer Unicode version than the other side knows.

use std::sync::OnceLock;

/// Sorted, disjoint inclusive ranges of the code points in general category L.
fn letter_ranges() -> &'static [(u32, u32)] {
    static RANGES: OnceLock<Vec<(u32, u32)>> = OnceLock::new();
    RANGES.get_or_init(|| {
        use regex_syntax::hir::{Class, HirKind};
        let hir = regex_syntax::parse(r"\p{L}").expect(r"regex-syntax knows \p{L}");
        match hir.kind() {
            HirKind::Class(Class::Unicode(class)) => class
                .ranges()
                .iter()
                .map(|r| (r.start() as u32, r.end() as u32))
                .collect(),
            other => unreachable!(r"\p{{L}} parsed as {other:?}"),
        }
    })
}

/// `\p{L}`: any letter (general categories Lu, Ll, Lt, Lm, Lo).
pub(crate) fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    let cp = c as u32;
    let ranges = letter_ranges();
    // The last range starting at or before `cp`.
    let i = ranges.partition_point(|&(start, _)| start <= cp);
    i > 0 && cp <= ranges[i - 1].1
}

/// `\p{N}`: any number (general categories Nd, Nl, No).
pub(crate) fn is_number(c: char) -> bool {
    c.is_numeric()
}

/// `\s`: the Unicode `White_Space` property (the 25 code points of llama.cpp's table).
pub(crate) fn is_whitespace(c: char) -> bool {
    c.is_whitespace()
}

/// Bytes that GPT-2's byte-level alphabet keeps as the same code point: the printable ranges
/// `!`..=`~`, `¡`..=`¬` and `®`..=`ÿ`. Every other byte `b` becomes the code point `256 + n`,
/// where `n` counts the non-printable bytes below `b`.
fn is_printable_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The byte-level alphabet: byte -> the character that stands for it in BPE token texts.
pub(crate) fn byte_to_char() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..=255u8 {
            table[b as usize] = if is_printable_byte(b) {
                char::from(b)
            } else {
                n += 1;
                char::from_u32(255 + n).expect("code points 256..=323 are valid")
            };
        }
        table
    })
}

/// The inverse of [`byte_to_char`]: `None` for a character outside the byte-level alphabet.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 256 {
        let b = cp as u8;
        return is_printable_byte(b).then_some(b);
    }
    // 256 + n stands for the n-th (0-based) non-printable byte.
    let n = cp.checked_sub(256)?;
    (0..=255u8)
        .filter(|&b| !is_printable_byte(b))
        .nth(n as usize)
}

/// Maps `text` into the byte-level alphabet (each UTF-8 byte becomes one character).
pub(crate) fn byte_encode(text: &str, out: &mut String) {
    let table = byte_to_char();
    out.clear();
    out.extend(text.bytes().map(|b| table[b as usize]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for c in ['a', 'Z', 'é', 'ß', 'Ω', 'я', '日', 'の', '한', 'ا'] {
            assert!(is_letter(c), "{c:?}");
        }
        for c in ['1', ' ', '_', '\u{0301}', '🦀', '½', '²', '\u{200d}', '.'] {
            assert!(!is_letter(c), "{c:?}");
        }
        for c in ['0', '9', '½', '²', '٣', 'Ⅻ'] {
            assert!(is_number(c), "{c:?}");
        }
        for c in [' ', '\t', '\n', '\u{a0}', '\u{3000}', '\u{85}', '\u{2028}'] {
            assert!(is_whitespace(c), "{c:?}");
        }
        for c in ['\u{200b}', '\u{1c}', 'x'] {
            assert!(!is_whitespace(c), "{c:?}");
        }
    }

    #[test]
    fn byte_alphabet_round_trips() {
        let table = byte_to_char();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[0xAD], '\u{143}');
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = table[b as usize];
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte('Ā'), Some(0));
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('日'), None);
    }
}
