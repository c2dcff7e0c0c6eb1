//! Just enough JSON for the kept disk's record: a string escaper for writing, and a reader for
//! one flat object. The crate has no serde, and the record is four fields; a person may also
//! edit or truncate the file, so the reader reports what it could not parse instead of failing.

use std::fmt::Write;

/// `s` as a JSON string literal, quotes included.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A member's value, as far as the record needs to tell them apart.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string, unescaped.
    Str(String),
    /// A number, as written (the record only holds non-negative integers).
    Num(String),
    /// `true`, `false`, `null`, an object or an array: parsed past, not kept.
    Other,
}

/// The members of the top-level object in `text`, in order. The error says what was wrong and
/// at which byte.
pub fn parse_object(text: &str) -> Result<Vec<(String, Value)>, String> {
    let mut parser = Parser {
        bytes: text.as_bytes(),
        pos: 0,
    };
    parser.skip_ws();
    if parser.peek() != Some(b'{') {
        return Err(parser.error("expected `{`"));
    }
    let members = parser.object(0)?;
    parser.skip_ws();
    if parser.pos != parser.bytes.len() {
        return Err(parser.error("unexpected text after the object"));
    }
    Ok(members)
}

/// Nesting deeper than this is not a record; the limit keeps recursion bounded.
const MAX_DEPTH: usize = 16;

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> String {
        format!("{what} at byte {}", self.pos)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        self.skip_ws();
        if self.peek() != Some(byte) {
            return Err(self.error(&format!("expected `{}`", char::from(byte))));
        }
        self.pos += 1;
        Ok(())
    }

    /// An object; the cursor is on its `{`.
    fn object(&mut self, depth: usize) -> Result<Vec<(String, Value)>, String> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.expect(b'{')?;
        let mut members = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(members);
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a member name"));
            }
            let name = self.string()?;
            self.expect(b':')?;
            let value = self.value(depth)?;
            members.push((name, value));
            self.skip_ws();
            match self.next() {
                Some(b',') => continue,
                Some(b'}') => return Ok(members),
                _ => return Err(self.error("expected `,` or `}`")),
            }
        }
    }

    /// An array; the cursor is on its `[`.
    fn array(&mut self, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.expect(b'[')?;
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.value(depth)?;
            self.skip_ws();
            match self.next() {
                Some(b',') => continue,
                Some(b']') => return Ok(()),
                _ => return Err(self.error("expected `,` or `]`")),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        self.skip_ws();
        match self.peek() {
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b'{') => self.object(depth + 1).map(|_| Value::Other),
            Some(b'[') => self.array(depth + 1).map(|_| Value::Other),
            Some(b'-' | b'0'..=b'9') => Ok(Value::Num(self.number())),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            _ => Err(self.error("expected a value")),
        }
    }

    fn literal(&mut self, word: &str) -> Result<Value, String> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(Value::Other)
        } else {
            Err(self.error("expected a value"))
        }
    }

    /// A number, loosely: the characters that can appear in one. The record's readers check
    /// the numbers they use.
    fn number(&mut self) -> String {
        let start = self.pos;
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.pos += 1;
        }
        String::from_utf8_lossy(&self.bytes[start..self.pos]).into_owned()
    }

    /// A string; the cursor is on its opening quote.
    fn string(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.next() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => break,
                Some(b'\\') => {
                    let c = match self.next() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => self.unicode_escape()?,
                        _ => return Err(self.error("invalid escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                Some(byte) if byte < 0x20 => {
                    return Err(self.error("control character in string"));
                }
                Some(byte) => out.push(byte),
            }
        }
        // The input is a &str, and escapes were encoded as UTF-8, so this only fails if a
        // multi-byte character was split, which the loop above cannot do.
        String::from_utf8(out).map_err(|_| self.error("invalid UTF-8 in string"))
    }

    /// The character after `\u` (the cursor is past the `u`), joining a surrogate pair.
    fn unicode_escape(&mut self) -> Result<char, String> {
        let high = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&high) {
            if self.next() != Some(b'\\') || self.next() != Some(b'u') {
                return Err(self.error("unpaired surrogate"));
            }
            let low = self.hex4()?;
            if !(0xdc00..0xe000).contains(&low) {
                return Err(self.error("unpaired surrogate"));
            }
            0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00)
        } else {
            high
        };
        char::from_u32(code).ok_or_else(|| self.error("invalid \\u escape"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .filter(|d| d.iter().all(u8::is_ascii_hexdigit))
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or_else(|| self.error("invalid \\u escape"))?;
        self.pos += 4;
        Ok(digits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(members: &[(String, Value)], name: &str) -> Value {
        members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    }

    #[test]
    fn quote_round_trips() {
        let nasty = "a\"b\\c\nd\te\u{1}f/é😀";
        let text = format!("{{\"s\": {}}}", quote(nasty));
        assert!(!text.contains('\n'));
        let members = parse_object(&text).unwrap();
        assert_eq!(get(&members, "s"), Value::Str(nasty.into()));
    }

    #[test]
    fn reads_members_and_skips_unknown_values() {
        let text = r#" {"system":"/nix/store/x","size_bytes" : 4096,
            "extra": {"a": [1, true, null, "]"]}, "flag": false, "u": "\u00e9\ud83d\ude00"} "#;
        let members = parse_object(text).unwrap();
        assert_eq!(get(&members, "system"), Value::Str("/nix/store/x".into()));
        assert_eq!(get(&members, "size_bytes"), Value::Num("4096".into()));
        assert_eq!(get(&members, "extra"), Value::Other);
        assert_eq!(get(&members, "u"), Value::Str("é😀".into()));
        assert_eq!(parse_object("{}").unwrap(), vec![]);
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        for text in [
            "",
            "[]",
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":\"x",
            "{\"a\":1,}",
            "{\"a\":tru}",
            "{\"a\":\"\\ud800\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":1} x",
            "\u{0}\u{0}\u{0}",
            &"[".repeat(100),
            &format!("{{\"a\":{}", "[".repeat(100)),
        ] {
            assert!(parse_object(text).is_err(), "{text:?}");
        }
    }
}
