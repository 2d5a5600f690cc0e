//! Any gRPC client gets answers, whatever `:authority` it sends.
//!
//! grpc-go dialing `passthrough:///PATH`, Python's grpc and Bazel send the
//! socket path (`/run/thinlayer/containerd.sock`) as the HTTP/2
//! `:authority`. h2, under tonic, parses `:authority` as a URI authority
//! and resets such a stream with PROTOCOL_ERROR ("malformed authority")
//! before the service sees it, and offers no option to accept it. So each
//! accepted connection is wrapped in [`FixAuthority`], which reads the
//! client's HTTP/2 byte stream ahead of h2 and hands h2 every header block
//! with an `:authority` that `http::uri::Authority` refuses replaced by
//! `localhost` (the original logged at debug).
//!
//! Protocol (RFC 9113 framing, RFC 7541 HPACK), client to server only; the
//! server's writes pass through untouched:
//! - the 24-byte connection preface passes as it is; a stream that does not
//!   open with it is not HTTP/2 and passes through whole, for h2 to refuse;
//! - then frames (9-byte head: length, type, flags, stream id). Every frame
//!   but HEADERS and CONTINUATION passes byte for byte, its payload streamed,
//!   never held;
//! - a header block (HEADERS, its PADDED and PRIORITY fields taken off, and
//!   the CONTINUATION frames up to END_HEADERS) is gathered whole and decoded
//!   with a decoder that tracks the client's dynamic table (its size updates
//!   honoured, up to the 4,096 bytes h2 allows: tonic never advertises
//!   another `SETTINGS_HEADER_TABLE_SIZE`). Every block is then encoded
//!   again, whether it was changed or not, as literals without indexing:
//!   that never touches h2's dynamic table, so the result is valid whatever
//!   state h2's decoder is in. It goes out as HEADERS (END_STREAM and the
//!   priority kept, padding dropped) and CONTINUATION frames of at most
//!   16,384 bytes, the least `SETTINGS_MAX_FRAME_SIZE` any peer must accept
//!   (and what tonic 0.9's h2 server advertises). A "never indexed" mark
//!   is not kept: h2 is the endpoint, no intermediary reads it. A
//!   PUSH_PROMISE, which no client may send, passes through for h2 to
//!   end the connection.
//!
//! What must never happen:
//! - a byte of anything but a header block changed, or a frame reordered;
//! - h2 decoding a block against a table that differs from the client's
//!   (hence every block is decoded here, and none re-encoded by reference);
//! - unbounded memory: a header block over [`MAX_BLOCK`] bytes on the wire,
//!   or decoding to over [`MAX_HEADER_LIST`] bytes, closes the connection,
//!   as do undecodable HPACK and broken framing (a CONTINUATION out of
//!   place, padding longer than its frame): h2 would end the connection for
//!   each of these too.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use containerd_snapshots::tonic::{codegen::http::uri::Authority, transport::server::Connected};
use loona_hpack::{Decoder, encoder::encode_integer_into};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame head: 24-bit length, type, flags, 32-bit stream id.
const HEAD_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Stream dependency (4 bytes) and weight (1) of a HEADERS frame.
const PRIORITY_LEN: usize = 5;

/// The largest header block taken, on the wire (all its frames' payloads,
/// padding included); a larger one closes the connection.
pub const MAX_BLOCK: usize = 64 * 1024;
/// The largest header list taken once decoded, counted as RFC 7541 §4.1
/// does (name + value + 32 per field); a larger one closes the connection.
pub const MAX_HEADER_LIST: usize = 256 * 1024;
/// The largest frame payload written: the least `SETTINGS_MAX_FRAME_SIZE`
/// an HTTP/2 peer may advertise (RFC 9113 §4.2), and hyper's server default.
const OUT_FRAME: usize = 16_384;
/// `SETTINGS_HEADER_TABLE_SIZE` as h2 holds it: the protocol's initial
/// value, since tonic's server never advertises another.
const TABLE_SIZE: usize = 4_096;
/// What a refused `:authority` becomes.
const LOCALHOST: &[u8] = b"localhost";

/// Bytes read from the connection at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A connection whose client-to-server HTTP/2 stream reaches the reader with
/// every unparsable `:authority` replaced by `localhost` (see the module
/// docs); writes go to the connection untouched.
///
/// A read fails (and the connection should be dropped) when the client
/// breaks HTTP/2 framing or HPACK, or sends a header block over
/// [`MAX_BLOCK`] or [`MAX_HEADER_LIST`] bytes.
pub struct FixAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    /// Bytes ready for the reader, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    scratch: Box<[u8]>,
    /// The connection ended or was refused: reads see the end.
    done: bool,
}

impl<S> FixAuthority<S> {
    /// Wraps a freshly accepted connection (nothing read from it yet).
    pub fn new(inner: S) -> FixAuthority<S> {
        FixAuthority {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            sent: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            done: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.sent < this.out.len() {
                let n = (this.out.len() - this.sent).min(buf.remaining());
                buf.put_slice(&this.out[this.sent..this.sent + n]);
                this.sent += n;
                if this.sent == this.out.len() {
                    this.out.clear();
                    this.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            let n = chunk.filled().len();
            if n == 0 {
                this.done = true;
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.rewriter.feed(&this.scratch[..n], &mut this.out) {
                tracing::warn!(error = %e, "HTTP/2 client refused; connection closed");
                this.done = true;
                this.out.clear();
                this.sent = 0;
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for FixAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A frame head, parsed.
#[derive(Clone, Copy, Debug)]
struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    /// As received, reserved bit included.
    stream: [u8; 4],
}

impl Head {
    fn parse(b: &[u8; HEAD_LEN]) -> Head {
        Head {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: [b[5], b[6], b[7], b[8]],
        }
    }

    /// Appends the head of a frame of `len` (at most [`OUT_FRAME`]) bytes.
    fn write(len: usize, kind: u8, flags: u8, stream: [u8; 4], out: &mut Vec<u8>) {
        let len = u32::try_from(len).expect("a frame written is at most OUT_FRAME bytes");
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream);
    }
}

/// Where the parser is in the client's byte stream.
enum State {
    /// This many bytes of the preface seen.
    Preface(usize),
    /// Between frames: `Rewriter::head` holds `head_len` bytes of the next head.
    Head,
    /// Passing this many more bytes of a frame's payload through.
    Pass(usize),
    /// Gathering the payload of a HEADERS or CONTINUATION frame.
    Fragment(Head, Vec<u8>),
    /// Not HTTP/2: everything passes through.
    Opaque,
}

/// A header block being gathered (HEADERS seen, END_HEADERS not yet).
struct Block {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    /// The header block fragments, padding and priority taken off.
    bytes: Vec<u8>,
    /// Payload bytes on the wire so far, for [`MAX_BLOCK`].
    wire: usize,
}

/// The client-to-server rewriting without I/O: [`Rewriter::feed`] takes the
/// bytes as they come, in any pieces, and appends what h2 should read.
pub(crate) struct Rewriter {
    state: State,
    head: [u8; HEAD_LEN],
    head_len: usize,
    block: Option<Block>,
    decoder: Decoder<'static>,
    /// `:authority` values replaced on this connection.
    replaced: u64,
}

impl Rewriter {
    pub(crate) fn new() -> Rewriter {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Rewriter {
            state: State::Preface(0),
            head: [0; HEAD_LEN],
            head_len: 0,
            block: None,
            decoder,
            replaced: 0,
        }
    }

    /// Takes the next `input` bytes from the client, appending to `out` what
    /// can be handed on so far.
    ///
    /// # Errors
    /// `InvalidData` when the connection must be closed (see the module
    /// docs); nothing should be fed after.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            match &mut self.state {
                State::Opaque => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Preface(got) => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let n = (PREFACE.len() - *got).min(input.len());
                    if input[..n] != PREFACE[*got..*got + n] {
                        self.state = State::Opaque;
                        continue;
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *got += n;
                    if *got == PREFACE.len() {
                        self.state = State::Head;
                    }
                }
                State::Head => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let n = (HEAD_LEN - self.head_len).min(input.len());
                    self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
                    self.head_len += n;
                    input = &input[n..];
                    if self.head_len == HEAD_LEN {
                        self.head_len = 0;
                        self.start_frame(out)?;
                    }
                }
                State::Pass(left) => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::Fragment(head, payload) => {
                    let n = (head.len - payload.len()).min(input.len());
                    payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if payload.len() < head.len {
                        return Ok(());
                    }
                    let State::Fragment(head, payload) =
                        std::mem::replace(&mut self.state, State::Head)
                    else {
                        unreachable!("matched as a fragment just above");
                    };
                    self.end_fragment(head, &payload, out)?;
                }
            }
        }
    }

    /// A whole frame head is in `self.head`: pass the frame on, or start
    /// gathering its header block fragment.
    fn start_frame(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let head = Head::parse(&self.head);
        if let Some(block) = &self.block {
            if head.kind != CONTINUATION || head.stream != block.stream {
                return Err(refused(
                    "a header block interrupted by another frame (CONTINUATION expected)",
                ));
            }
        }
        match head.kind {
            HEADERS | CONTINUATION => {
                if head.kind == CONTINUATION && self.block.is_none() {
                    return Err(refused("CONTINUATION outside a header block"));
                }
                let wire = self.block.as_ref().map_or(0, |b| b.wire);
                if wire + head.len > MAX_BLOCK {
                    return Err(refused(format!("a header block over {MAX_BLOCK} bytes")));
                }
                self.state = State::Fragment(head, Vec::with_capacity(head.len));
            }
            _ => {
                out.extend_from_slice(&self.head);
                self.state = if head.len == 0 {
                    State::Head
                } else {
                    State::Pass(head.len)
                };
            }
        }
        Ok(())
    }

    /// A HEADERS or CONTINUATION frame is in: add its fragment to the block,
    /// and hand the block on at END_HEADERS.
    fn end_fragment(&mut self, head: Head, payload: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if head.kind == HEADERS {
            let mut body = payload;
            let mut pad = 0;
            if head.flags & PADDED != 0 {
                let (&p, rest) = body
                    .split_first()
                    .ok_or_else(|| refused("a PADDED HEADERS frame without its pad length"))?;
                pad = usize::from(p);
                body = rest;
            }
            let mut priority = None;
            if head.flags & PRIORITY != 0 {
                let (p, rest) = body
                    .split_first_chunk::<PRIORITY_LEN>()
                    .ok_or_else(|| refused("a HEADERS frame too short for its priority"))?;
                priority = Some(*p);
                body = rest;
            }
            let end = body
                .len()
                .checked_sub(pad)
                .ok_or_else(|| refused("HEADERS padding longer than the frame"))?;
            self.block = Some(Block {
                stream: head.stream,
                end_stream: head.flags & END_STREAM != 0,
                priority,
                bytes: body[..end].to_vec(),
                wire: head.len,
            });
        } else {
            let block = self
                .block
                .as_mut()
                .expect("start_frame takes a CONTINUATION only inside a block");
            block.bytes.extend_from_slice(payload);
            block.wire += head.len;
        }
        if head.flags & END_HEADERS != 0 {
            let block = self.block.take().expect("a fragment belongs to a block");
            self.rewrite(&block, out)?;
        }
        Ok(())
    }

    /// Decodes a whole block, fixes its `:authority`, and appends it encoded
    /// without the dynamic table.
    fn rewrite(&mut self, block: &Block, out: &mut Vec<u8>) -> io::Result<()> {
        let mut fields = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block.bytes, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_LIST {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| refused(format!("an undecodable header block: {e}")))?;
        if size > MAX_HEADER_LIST {
            return Err(refused(format!(
                "a header list over {MAX_HEADER_LIST} bytes"
            )));
        }
        for (name, value) in &mut fields {
            if name == b":authority" && Authority::try_from(&value[..]).is_err() {
                self.replaced += 1;
                let original = String::from_utf8_lossy(value);
                let stream = u32::from_be_bytes(block.stream) & 0x7fff_ffff;
                if self.replaced == 1 {
                    tracing::debug!(
                        %original, stream,
                        "`:authority` is no URI authority; h2 gets `localhost` (first on this connection)"
                    );
                } else {
                    tracing::trace!(%original, stream, "`:authority` replaced");
                }
                *value = LOCALHOST.to_vec();
            }
        }
        write_block(block, &encode_plain(&fields), out);
        Ok(())
    }
}

/// `fields` as an HPACK block of literals without indexing, new names
/// (RFC 7541 §6.2.2): valid for any decoder state, changing none.
fn encode_plain(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        for s in [name, value] {
            encode_integer_into(s.len(), 7, 0, &mut out).expect("writing to a Vec cannot fail");
            out.extend_from_slice(s);
        }
    }
    out
}

/// Appends `encoded` as HEADERS + CONTINUATION frames of `block`'s stream,
/// none over [`OUT_FRAME`] bytes.
fn write_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let prio = block.priority.map_or(0, |p| p.len());
    let (first, rest) = encoded.split_at(encoded.len().min(OUT_FRAME - prio));
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    Head::write(prio + first.len(), HEADERS, flags, block.stream, out);
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    let mut chunks = rest.chunks(OUT_FRAME).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        Head::write(chunk.len(), CONTINUATION, flags, block.stream, out);
        out.extend_from_slice(chunk);
    }
}

fn refused(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::{Encoder, encoder::encode_integer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    const DATA: u8 = 0x0;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const WINDOW_UPDATE: u8 = 0x8;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        let len = u32::try_from(payload.len()).unwrap();
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A connection's opening: the preface and an empty SETTINGS.
    fn opening() -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        v.extend(frame(SETTINGS, 0, 0, &[]));
        v
    }

    fn request(authority: &str, extra: &[(&str, &str)]) -> Fields {
        let mut f: Fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/containerd.services.snapshots.v1.Snapshots/Stat"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.59.0"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        f.extend(
            extra
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        f
    }

    /// `fields` encoded as grpc-go would: names and values indexed into the
    /// dynamic table.
    fn encode(enc: &mut Encoder<'static>, fields: &Fields) -> Vec<u8> {
        enc.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// Frames after the preface: (type, flags, stream, payload).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let head = Head::parse(rest[..HEAD_LEN].try_into().unwrap());
            let payload = rest[HEAD_LEN..HEAD_LEN + head.len].to_vec();
            out.push((
                head.kind,
                head.flags,
                u32::from_be_bytes(head.stream),
                payload,
            ));
            rest = &rest[HEAD_LEN + head.len..];
        }
        out
    }

    /// The header blocks in `bytes`, as h2 would decode them (one decoder
    /// across them all), with each block's first-frame flags; checks that
    /// no frame exceeds OUT_FRAME and blocks end with END_HEADERS.
    fn blocks(bytes: &[u8]) -> Vec<(u8, Fields)> {
        let mut dec = Decoder::new();
        let mut out = Vec::new();
        let mut open: Option<(u8, Vec<u8>)> = None;
        for (kind, flags, _, payload) in frames(bytes) {
            match kind {
                HEADERS => {
                    assert!(open.is_none());
                    assert!(payload.len() <= OUT_FRAME, "a frame over 16 KiB");
                    assert_eq!(flags & PADDED, 0, "padding is dropped");
                    let skip = if flags & PRIORITY != 0 {
                        PRIORITY_LEN
                    } else {
                        0
                    };
                    open = Some((flags, payload[skip..].to_vec()));
                }
                CONTINUATION => {
                    assert!(payload.len() <= OUT_FRAME, "a frame over 16 KiB");
                    open.as_mut().expect("in a block").1.extend(payload);
                }
                _ => {
                    assert!(open.is_none());
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                let (first, block) = open.take().unwrap();
                out.push((first, dec.decode(&block).unwrap()));
            }
        }
        assert!(open.is_none(), "a block without END_HEADERS");
        out
    }

    fn with_authority(mut f: Fields, authority: &str) -> Fields {
        for (n, v) in &mut f {
            if n == b":authority" {
                *v = authority.as_bytes().to_vec();
            }
        }
        f
    }

    /// `input` through the adapter over an in-memory duplex, written in
    /// `piece`-byte writes; what h2 would read.
    async fn through(input: &[u8], piece: usize) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1024);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for p in input.chunks(piece) {
                if client.write_all(p).await.is_err() {
                    break;
                }
            }
            let _ = client.shutdown().await;
        });
        let mut fixed = FixAuthority::new(server);
        let mut got = Vec::new();
        let read = fixed.read_to_end(&mut got).await;
        drop(fixed);
        writer.await.unwrap();
        read.map(|_| got)
    }

    fn feed_all(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Rewriter::new().feed(input, &mut out)?;
        Ok(out)
    }

    #[tokio::test]
    async fn socket_path_authority_becomes_localhost_other_fields_intact() {
        let mut enc = Encoder::new();
        let fields = request("/run/thinlayer.sock", &[("x-extra", "kept")]);
        let mut input = opening();
        input.extend(frame(HEADERS, END_HEADERS, 1, &encode(&mut enc, &fields)));
        let got = through(&input, 4096).await.unwrap();
        assert_eq!(
            &got[..opening().len()],
            &opening()[..],
            "preface, SETTINGS as sent"
        );
        let b = blocks(&got);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].1, with_authority(fields, "localhost"));
        assert_eq!(b[0].0, END_HEADERS);
    }

    #[test]
    fn valid_authorities_are_kept_invalid_ones_replaced() {
        for (sent, seen) in [
            ("localhost", "localhost"),
            ("127.0.0.1:1234", "127.0.0.1:1234"),
            ("[::1]:50051", "[::1]:50051"),
            ("unix", "unix"),
            ("/run/containerd/containerd.sock", "localhost"),
            ("unix:///run/x.sock", "localhost"),
            ("a b", "localhost"),
            ("", "localhost"),
        ] {
            let mut enc = Encoder::new();
            let fields = request(sent, &[]);
            let mut input = opening();
            input.extend(frame(HEADERS, END_HEADERS, 1, &encode(&mut enc, &fields)));
            let b = blocks(&feed_all(&input).unwrap());
            assert_eq!(b[0].1, with_authority(fields, seen), "{sent:?}");
        }
    }

    #[tokio::test]
    async fn continuation_frames_are_joined_and_the_block_rewritten() {
        let mut enc = Encoder::new();
        let fields = request("/run/thinlayer.sock", &[("x-a", "1"), ("x-b", "2")]);
        let block = encode(&mut enc, &fields);
        let (a, rest) = block.split_at(7);
        let (b, c) = rest.split_at(30);
        let mut input = opening();
        input.extend(frame(HEADERS, END_STREAM, 3, a));
        input.extend(frame(CONTINUATION, 0, 3, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, c));
        let got = through(&input, 5).await.unwrap();
        let b = blocks(&got);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].0, END_STREAM | END_HEADERS, "END_STREAM kept");
        assert_eq!(b[0].1, with_authority(fields, "localhost"));
        assert!(
            frames(&got).iter().skip(1).all(|f| f.2 == 3),
            "after SETTINGS, all on the request's stream"
        );
    }

    #[tokio::test]
    async fn padded_and_priority_headers_keep_the_priority_lose_the_padding() {
        let mut enc = Encoder::new();
        let fields = request("/run/thinlayer.sock", &[]);
        let prio = [0x80, 0, 0, 1, 200];
        let mut payload = vec![7];
        payload.extend(prio);
        payload.extend(encode(&mut enc, &fields));
        payload.extend([0; 7]);
        let mut input = opening();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_HEADERS, 5, &payload));
        let got = through(&input, 3).await.unwrap();
        let f = frames(&got);
        let (kind, flags, stream, payload) = f.last().unwrap();
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, PRIORITY | END_HEADERS, 5)
        );
        assert_eq!(payload[..PRIORITY_LEN], prio);
        assert_eq!(blocks(&got)[0].1, with_authority(fields, "localhost"));

        // Broken padding closes the connection.
        let mut bad = opening();
        bad.extend(frame(HEADERS, PADDED | END_HEADERS, 5, &[9, 0x82]));
        assert_eq!(
            through(&bad, 64).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[tokio::test]
    async fn the_clients_dynamic_table_is_tracked_across_requests() {
        let mut enc = Encoder::new();
        let mut input = opening();
        let mut sent = Vec::new();
        for i in 0..4u32 {
            let fields = request(
                "/run/thinlayer.sock",
                &[("x-request", &i.to_string()), ("x-same", "same")],
            );
            let mut block = Vec::new();
            if i == 2 {
                // Empty the table: what follows is literals only...
                block.extend(encode_integer(0, 5).iter().map(|b| b | 0x20));
                enc.set_max_table_size(0);
            } else if i == 3 {
                // ...then grow it back and index again.
                block.extend({
                    let mut v = encode_integer(TABLE_SIZE, 5);
                    v[0] |= 0x20;
                    v
                });
                enc.set_max_table_size(TABLE_SIZE);
            }
            block.extend(encode(&mut enc, &fields));
            input.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &block));
            input.extend(frame(DATA, END_STREAM, 2 * i + 1, b"\0\0\0\0\0"));
            sent.push(with_authority(fields, "localhost"));
        }
        let got = through(&input, 11).await.unwrap();
        let b: Vec<Fields> = blocks(&got).into_iter().map(|b| b.1).collect();
        assert_eq!(b, sent);

        // An emptied table is empty: an index into it is refused.
        let mut emptied = opening();
        let mut enc = Encoder::new();
        let fields = request("x", &[("x-new", "1")]);
        emptied.extend(frame(HEADERS, END_HEADERS, 1, &encode(&mut enc, &fields)));
        assert!(feed_all(&emptied).is_ok());
        emptied.extend(frame(HEADERS, END_HEADERS, 3, &[0x20, 0x80 | 62]));
        assert!(feed_all(&emptied).is_err());

        // A size update beyond what h2 allows is refused.
        let mut bad = opening();
        let mut update = encode_integer(TABLE_SIZE + 1, 5);
        update[0] |= 0x20;
        update.push(0x82);
        bad.extend(frame(HEADERS, END_HEADERS, 1, &update));
        assert!(feed_all(&bad).is_err());
    }

    #[tokio::test]
    async fn a_large_block_is_split_into_frames_h2_accepts() {
        let mut enc = Encoder::new();
        let big = "v".repeat(20_000);
        let bigger = "w".repeat(15_000);
        let fields = request(
            "/run/thinlayer.sock",
            &[("x-big", big.as_str()), ("x-bigger", bigger.as_str())],
        );
        let block = encode(&mut enc, &fields);
        let mut input = opening();
        let mut chunks = block.chunks(OUT_FRAME).peekable();
        let mut first = true;
        while let Some(c) = chunks.next() {
            let kind = if first { HEADERS } else { CONTINUATION };
            let flags = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            input.extend(frame(kind, flags, 1, c));
            first = false;
        }
        let got = through(&input, 1000).await.unwrap();
        let f = frames(&got);
        assert!(
            f.len() >= 4,
            "SETTINGS, HEADERS and CONTINUATIONs: {}",
            f.len()
        );
        let b = blocks(&got);
        assert_eq!(b[0].1, with_authority(fields, "localhost"));
    }

    #[tokio::test]
    async fn an_oversized_block_closes_the_connection() {
        let mut input = opening();
        input.extend(frame(HEADERS, 0, 1, &[0x82; 16_000]));
        for _ in 0..4 {
            input.extend(frame(CONTINUATION, 0, 1, &[0x82; 16_000]));
        }
        let e = through(&input, 4096).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("over 65536"), "{e}");
    }

    #[tokio::test]
    async fn other_frames_pass_byte_for_byte() {
        let mut input = opening();
        input.extend(frame(DATA, 0, 1, &[0xab; 40_000]));
        input.extend(frame(DATA, PADDED | END_STREAM, 1, &[3, 1, 2, 0, 0, 0]));
        input.extend(frame(PING, 0, 0, b"12345678"));
        input.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 1, 0, 0]));
        input.extend(frame(SETTINGS, 1, 0, &[]));
        assert_eq!(through(&input, 777).await.unwrap(), input);
        assert_eq!(feed_all(&input).unwrap(), input);
    }

    #[tokio::test]
    async fn frames_torn_across_reads_come_out_the_same() {
        let mut enc = Encoder::new();
        let mut input = opening();
        for i in 0..3u32 {
            let fields = request("/run/thinlayer.sock", &[("x-i", &i.to_string())]);
            let block = encode(&mut enc, &fields);
            let (a, b) = block.split_at(block.len() / 2);
            input.extend(frame(HEADERS, 0, 2 * i + 1, a));
            input.extend(frame(CONTINUATION, END_HEADERS, 2 * i + 1, b));
            input.extend(frame(DATA, END_STREAM, 2 * i + 1, b"\0\0\0\0\x02\x0a\0"));
        }
        let whole = feed_all(&input).unwrap();
        // Fed one byte at a time, sans I/O...
        let mut r = Rewriter::new();
        let mut bytewise = Vec::new();
        for b in &input {
            r.feed(std::slice::from_ref(b), &mut bytewise).unwrap();
        }
        assert_eq!(bytewise, whole);
        // ...and through the adapter in odd pieces.
        for piece in [1, 2, 9, 10, 100] {
            assert_eq!(through(&input, piece).await.unwrap(), whole, "{piece}");
        }
        assert_eq!(blocks(&whole).len(), 3);
    }

    #[tokio::test]
    async fn not_http2_passes_through() {
        let input = b"GET / HTTP/1.1\r\nHost: /run/x.sock\r\n\r\n".to_vec();
        assert_eq!(through(&input, 3).await.unwrap(), input);
    }

    #[test]
    fn broken_framing_is_refused() {
        let mut enc = Encoder::new();
        let block = encode(&mut enc, &request("x", &[]));
        // A block interrupted by another frame.
        let mut input = opening();
        input.extend(frame(HEADERS, 0, 1, &block));
        input.extend(frame(DATA, 0, 1, b"x"));
        assert!(feed_all(&input).is_err());
        // A CONTINUATION on another stream.
        let mut input = opening();
        input.extend(frame(HEADERS, 0, 1, &block));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &[]));
        assert!(feed_all(&input).is_err());
        // A CONTINUATION on its own.
        let mut input = opening();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block));
        assert!(feed_all(&input).is_err());
        // HPACK garbage (an index past both tables).
        let mut input = opening();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]));
        assert!(feed_all(&input).is_err());
    }
}
