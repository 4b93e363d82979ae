//! The frame and handshake decoders over a corpus of malformed input: each
//! case must produce its specific typed error (or "need more bytes"), never
//! a panic. The same cases seed the cargo-fuzz target (`fuzz/`).

use warren_ipc::frame::{FrameError, HEADER_LEN, MAX_FRAME_LEN, decode_frame, encode_frame};
use warren_ipc::handshake::{ClientHello, HandshakeError, PROTOCOL_VERSION};
use warren_ipc::{ClientFrame, Request, ServerFrame};

fn valid() -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(
        &ClientFrame {
            id: 5,
            request: Request::Hello {
                client: "corpus".into(),
            },
        },
        0,
        &mut out,
    )
    .expect("encode");
    out
}

fn header(len: u32, n_fds: u8, flags: u8) -> Vec<u8> {
    let mut h = len.to_be_bytes().to_vec();
    h.push(n_fds);
    h.push(flags);
    h
}

#[derive(Debug)]
enum Expect {
    NeedMore,
    Err(fn(&FrameError) -> bool),
}

fn corpus() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let v = valid();
    let mut cases: Vec<(&'static str, Vec<u8>, Expect)> = vec![
        ("empty input", vec![], Expect::NeedMore),
        ("truncated header", v[..3].to_vec(), Expect::NeedMore),
        (
            "truncated body",
            v[..v.len() - 1].to_vec(),
            Expect::NeedMore,
        ),
        (
            "oversized length, one over the cap",
            header(MAX_FRAME_LEN as u32 + 1, 0, 0),
            Expect::Err(|e| matches!(e, FrameError::TooLarge { .. })),
        ),
        (
            "oversized length, u32::MAX",
            header(u32::MAX, 0, 0),
            Expect::Err(|e| matches!(e, FrameError::TooLarge { .. })),
        ),
        (
            "zero length",
            header(0, 0, 0),
            Expect::Err(|e| matches!(e, FrameError::Empty)),
        ),
        (
            "reserved flags",
            [header(1, 0, 0x80), vec![0]].concat(),
            Expect::Err(|e| matches!(e, FrameError::BadFlags(0x80))),
        ),
        (
            "too many fds",
            [header(1, 9, 0), vec![0]].concat(),
            Expect::Err(|e| matches!(e, FrameError::TooManyFds { n: 9, .. })),
        ),
        (
            "unknown request variant",
            [header(2, 0, 0), vec![1, 0x7f]].concat(),
            Expect::Err(|e| matches!(e, FrameError::Decode(_))),
        ),
        (
            "body cut inside a string",
            [header(3, 0, 0), vec![1, 0, 50]].concat(),
            Expect::Err(|e| matches!(e, FrameError::Decode(_))),
        ),
        (
            "string length beyond the body",
            [header(4, 0, 0), vec![1, 0, 0xff, 0xff]].concat(),
            Expect::Err(|e| matches!(e, FrameError::Decode(_))),
        ),
        (
            "invalid utf-8 in a string",
            [header(5, 0, 0), vec![1, 0, 2, 0xc3, 0x28]].concat(),
            Expect::Err(|e| matches!(e, FrameError::Decode(_))),
        ),
        (
            "overlong varint id",
            [header(12, 0, 0), vec![0xff; 11], vec![1]].concat(),
            Expect::Err(|e| matches!(e, FrameError::Decode(_))),
        ),
    ];
    let mut trailing = v.clone();
    let body_len = (v.len() - HEADER_LEN + 3) as u32;
    trailing[..4].copy_from_slice(&body_len.to_be_bytes());
    trailing.extend_from_slice(&[1, 2, 3]);
    cases.push((
        "trailing bytes",
        trailing,
        Expect::Err(|e| matches!(e, FrameError::TrailingBytes(3))),
    ));
    cases
}

#[test]
fn every_malformed_frame_gets_its_typed_error() {
    for (name, bytes, expect) in corpus() {
        let got = decode_frame::<ClientFrame>(&bytes);
        match (&expect, &got) {
            (Expect::NeedMore, Ok(None)) => {}
            (Expect::Err(ok), Err(e)) if ok(e) => {}
            _ => panic!("{name}: expected {expect:?}, got {got:?}"),
        }
        // The server-side decoder must not panic on the same bytes either.
        let _ = decode_frame::<ServerFrame>(&bytes);
    }
}

#[test]
fn wrong_versions_and_magic_are_refused() {
    let mut wrong_magic = ClientHello::CURRENT.encode();
    wrong_magic[0] = b'X';
    assert_eq!(
        ClientHello::decode(&wrong_magic),
        Err(HandshakeError::BadMagic)
    );
    let future = ClientHello {
        min: PROTOCOL_VERSION + 1,
        max: PROTOCOL_VERSION + 9,
    };
    let decoded = ClientHello::decode(&future.encode()).expect("well-formed");
    assert!(matches!(
        decoded.negotiate(),
        Err(HandshakeError::NoCommonVersion { .. })
    ));
    let zero = ClientHello { min: 0, max: 0 };
    assert!(matches!(
        ClientHello::decode(&zero.encode()),
        Err(HandshakeError::BadRange { .. })
    ));
}

#[test]
fn valid_frame_followed_by_garbage_yields_the_frame_first() {
    let mut bytes = valid();
    let first_len = bytes.len();
    bytes.extend_from_slice(&header(u32::MAX, 0, 0));
    let (msg, _, used) = decode_frame::<ClientFrame>(&bytes)
        .expect("first frame is fine")
        .expect("complete");
    assert_eq!(msg.id, 5);
    assert_eq!(used, first_len);
    assert!(decode_frame::<ClientFrame>(&bytes[used..]).is_err());
}
