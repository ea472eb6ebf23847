//! Frame headers (RFC 6455 §5.2): opcodes, bits, lengths, masking keys.
//!
//! This module only encodes and decodes headers; it knows nothing of message
//! state. Payloads are handled by [`crate::connection`], which unmasks them in
//! place in its read buffer.

use bytes::BytesMut;

use crate::error::ProtocolError;

/// A frame opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: first frame of a text message.
    Text,
    /// 0x2: first frame of a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// Decodes the 4-bit opcode; reserved values are a protocol error.
    pub fn from_u8(value: u8) -> Result<OpCode, ProtocolError> {
        Ok(match value {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }

    /// The 4-bit wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// RSV1 (permessage-deflate: "this message is compressed").
    pub rsv1: bool,
    /// RSV2, reserved.
    pub rsv2: bool,
    /// RSV3, reserved.
    pub rsv3: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, present on client-to-server frames.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub payload_len: u64,
}

/// Longest possible header: 2 + 8 (length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;

impl FrameHeader {
    /// Decodes a header from the start of `buf`. Returns the header and its
    /// length in bytes, or `Ok(None)` when `buf` holds only part of it.
    ///
    /// Reserved opcodes and a 64-bit length with its top bit set are errors;
    /// everything that depends on connection state (masking direction,
    /// reserved bits, fragmentation) is checked by the caller.
    #[inline]
    pub fn decode(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let opcode = OpCode::from_u8(b0 & 0x0F)?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, mut pos) = match b1 & 0x7F {
            126 => {
                let Some(ext) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u16::from_be_bytes([ext[0], ext[1]]) as u64, 4)
            }
            127 => {
                let Some(ext) = buf.get(2..10) else {
                    return Ok(None);
                };
                let len = u64::from_be_bytes(ext.try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        let mask = if masked {
            let Some(key) = buf.get(pos..pos + 4) else {
                return Ok(None);
            };
            pos += 4;
            Some(key.try_into().expect("4 bytes"))
        } else {
            None
        };
        Ok(Some((
            FrameHeader {
                fin: b0 & 0x80 != 0,
                rsv1: b0 & 0x40 != 0,
                rsv2: b0 & 0x20 != 0,
                rsv3: b0 & 0x10 != 0,
                opcode,
                mask,
                payload_len,
            },
            pos,
        )))
    }

    /// Appends the encoded header to `out`, using the shortest length form.
    pub fn encode(&self, out: &mut BytesMut) {
        let (bytes, len) = self.to_bytes();
        out.extend_from_slice(&bytes[..len]);
    }

    /// The header's first byte: FIN, RSV1-3 and the opcode.
    pub fn first_byte(&self) -> u8 {
        let mut b0 = self.opcode.as_u8();
        if self.fin {
            b0 |= 0x80;
        }
        if self.rsv1 {
            b0 |= 0x40;
        }
        if self.rsv2 {
            b0 |= 0x20;
        }
        if self.rsv3 {
            b0 |= 0x10;
        }
        b0
    }

    /// The encoded header, in the shortest length form: its first `len`
    /// bytes (built on the stack, so that a frame's header is one copy
    /// into the output, not a capacity check per byte).
    pub fn to_bytes(&self) -> ([u8; MAX_HEADER_LEN], usize) {
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut bytes = [0u8; MAX_HEADER_LEN];
        bytes[0] = self.first_byte();
        let mut len = match self.payload_len {
            n @ 0..=125 => {
                bytes[1] = mask_bit | n as u8;
                2
            }
            n @ 126..=0xFFFF => {
                bytes[1] = mask_bit | 126;
                bytes[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                4
            }
            n => {
                bytes[1] = mask_bit | 127;
                bytes[2..10].copy_from_slice(&n.to_be_bytes());
                10
            }
        };
        if let Some(key) = self.mask {
            bytes[len..len + 4].copy_from_slice(&key);
            len += 4;
        }
        (bytes, len)
    }

    /// Length of the encoded header.
    pub fn encoded_len(&self) -> usize {
        let len = match self.payload_len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        len + if self.mask.is_some() { 4 } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: OpCode, len: u64, mask: Option<[u8; 4]>) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask,
            payload_len: len,
        }
    }

    #[test]
    fn rfc6455_5_7_examples() {
        // A single-frame unmasked text message "Hello".
        let (h, n) = FrameHeader::decode(b"\x81\x05Hello").unwrap().unwrap();
        assert_eq!((h, n), (header(OpCode::Text, 5, None), 2));
        // A single-frame masked text message.
        let (h, n) = FrameHeader::decode(b"\x81\x85\x37\xfa\x21\x3d")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h, n),
            (header(OpCode::Text, 5, Some([0x37, 0xfa, 0x21, 0x3d])), 6)
        );
        // 256 bytes binary in a single unmasked frame.
        let (h, n) = FrameHeader::decode(b"\x82\x7E\x01\x00").unwrap().unwrap();
        assert_eq!((h, n), (header(OpCode::Binary, 256, None), 4));
        // 64 KiB binary in a single unmasked frame.
        let (h, n) = FrameHeader::decode(b"\x82\x7F\x00\x00\x00\x00\x00\x01\x00\x00")
            .unwrap()
            .unwrap();
        assert_eq!((h, n), (header(OpCode::Binary, 65536, None), 10));
    }

    #[test]
    fn rfc6455_5_2_partial_headers_need_more() {
        let full = b"\x82\xFF\x00\x00\x00\x00\x00\x01\x00\x00\x01\x02\x03\x04";
        for len in 0..full.len() {
            assert_eq!(FrameHeader::decode(&full[..len]), Ok(None), "{len}");
        }
        assert!(FrameHeader::decode(full).unwrap().is_some());
    }

    #[test]
    fn rfc6455_5_2_reserved_opcodes_and_length_msb() {
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                FrameHeader::decode(&[0x80 | op, 0]),
                Err(ProtocolError::ReservedOpcode(op))
            );
        }
        assert_eq!(
            FrameHeader::decode(b"\x82\x7F\x80\x00\x00\x00\x00\x00\x00\x00"),
            Err(ProtocolError::InvalidLength)
        );
    }

    #[test]
    fn encode_decode_round_trip_at_length_boundaries() {
        for len in [
            0u64,
            125,
            126,
            65535,
            65536,
            u32::MAX as u64 + 1,
            (1 << 63) - 1,
        ] {
            for mask in [None, Some([9, 8, 7, 6])] {
                let h = header(OpCode::Binary, len, mask);
                let mut out = BytesMut::new();
                h.encode(&mut out);
                assert_eq!(out.len(), h.encoded_len());
                assert_eq!(FrameHeader::decode(&out).unwrap(), Some((h, out.len())));
            }
        }
    }
}
