//! The chunked transfer coding (RFC 9112 §7.1), read incrementally: as bytes arrive, in
//! any split. Strict like hyper's decoder: hex sizes (no sign, at most 16 digits), CRLF
//! line ends, extensions skipped, trailer fields skipped (a bounded section). Used two
//! ways: a request body is decoded (the data copied out, it is forwarded with its
//! length); a response body is passed on as it is and only followed, to know where it
//! ends and whether it was well formed.

/// Most bytes of chunk extensions and trailer fields accepted in one body.
const MAX_META_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size,
    /// After the size: optional whitespace, then `;ext` or CRLF.
    AfterSize,
    Extension,
    /// Expecting the LF of the size line.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// In a trailer field's name, up to its colon.
    TrailerName,
    /// In a trailer field's value, up to CR.
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body being read.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    size: u64,
    digits: u8,
    meta: usize,
}

/// The body is not validly chunked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

impl Default for Chunked {
    fn default() -> Self {
        Self {
            state: State::Size,
            size: 0,
            digits: 0,
            meta: 0,
        }
    }
}

impl Chunked {
    /// Whether the last chunk and the trailer section have been read.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads `input`; the data of the chunks goes to `data` (when decoding). Returns how
    /// many bytes of `input` belong to the body: all of it, unless the body ended inside
    /// it (what follows is the next message).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut data: Option<&mut Vec<u8>>,
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => match hex(b) {
                    Some(d) => {
                        if self.digits == 16 {
                            return Err(ChunkError);
                        }
                        self.size = self.size << 4 | u64::from(d);
                        self.digits += 1;
                    }
                    None if self.digits == 0 => return Err(ChunkError),
                    None => {
                        self.state = State::AfterSize;
                        continue;
                    }
                },
                State::AfterSize => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = State::Extension,
                    b'\r' => self.state = State::SizeLf,
                    _ => return Err(ChunkError),
                },
                State::Extension => {
                    self.meta += 1;
                    if self.meta > MAX_META_BYTES {
                        return Err(ChunkError);
                    }
                    match b {
                        b'\r' => self.state = State::SizeLf,
                        b'\n' => return Err(ChunkError),
                        _ => {}
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let n = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    if let Some(out) = data.as_deref_mut() {
                        out.extend_from_slice(&input[i..i + n]);
                    }
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = State::Size;
                    self.digits = 0;
                }
                State::TrailerStart
                | State::TrailerName
                | State::TrailerValue
                | State::TrailerLf => self.trailer_byte(b)?,
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

impl Chunked {
    /// One byte of the trailer section: field lines as in a head (a token name, a colon,
    /// a value without control characters but HTAB), each ended by CRLF. The fields are
    /// skipped, but one that a parser would refuse makes the body malformed: a proxy that
    /// passed what the blade's parser refuses would disagree with it about the message.
    fn trailer_byte(&mut self, b: u8) -> Result<(), ChunkError> {
        if self.state != State::TrailerStart {
            self.meta += 1;
            if self.meta > MAX_META_BYTES {
                return Err(ChunkError);
            }
        }
        self.state = match (self.state, b) {
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart | State::TrailerName, b) if is_tchar(b) => State::TrailerName,
            (State::TrailerName, b':') => State::TrailerValue,
            (State::TrailerValue, b'\r') => State::TrailerLf,
            (State::TrailerValue, b) if b == b'\t' || (b >= 0x20 && b != 0x7f) => {
                State::TrailerValue
            }
            (State::TrailerLf, b'\n') => State::TrailerStart,
            _ => return Err(ChunkError),
        };
        Ok(())
    }
}

/// A token character of a field name (RFC 9110 section 5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trailer_field_a_parser_would_refuse_makes_the_body_malformed() {
        for bad in [
            &b"0\r\nx-trailer\0 t\r\n\r\n"[..],
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n: empty name\r\n\r\n",
            b"0\r\nx-t: a\x01b\r\n\r\n",
            b"0\r\n folded: x\r\n\r\n",
        ] {
            let mut c = Chunked::default();
            assert_eq!(
                c.feed(bad, None),
                Err(ChunkError),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut c = Chunked::default();
        let good = b"0\r\nx-trailer: 1\r\nexpires:\tnever \xe9\r\n\r\n";
        assert_eq!(c.feed(good, None), Ok(good.len()));
        assert!(c.done());
    }

    fn decode_in_pieces(raw: &[u8], piece: usize) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let mut used = 0;
        for part in raw.chunks(piece) {
            let n = c.feed(part, Some(&mut out))?;
            used += n;
            if c.done() {
                return Ok((out, used));
            }
        }
        Err(ChunkError)
    }

    #[test]
    fn bodies_decode_in_any_split_and_stop_at_their_end() {
        let raw =
            b"5;name=v\r\nhello\r\nA\r\n, world! +\r\n0\r\nx-trailer: 1\r\n\r\nGET / HTTP/1.1";
        for piece in 1..raw.len() {
            let (data, used) = decode_in_pieces(raw, piece).unwrap();
            assert_eq!(data, b"hello, world! +", "split {piece}");
            assert_eq!(&raw[used..], b"GET / HTTP/1.1", "split {piece}");
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for raw in [
            &b"zz\r\nabc\r\n0\r\n\r\n"[..],
            b"fffffffffffffffff\r\na\r\n0\r\n\r\n",
            b"2\r\nabcdef\r\n0\r\n\r\n",
            b"-1\r\na\r\n0\r\n\r\n",
            b"1\na\r\n0\r\n\r\n",
            b"\r\n",
        ] {
            assert_eq!(
                decode_in_pieces(raw, 64).err(),
                Some(ChunkError),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
