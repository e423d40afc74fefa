//! RESP for redmesh: frames (RESP2 and RESP3), resumable decoders for
//! client requests and server replies with Redis's limits and error texts,
//! and the Redis command table with key extraction.
//!
//! Modelled on mini-redis's split (frame / connection / parse) but built
//! for a proxy: requests keep their raw bytes for forwarding, replies are
//! found by boundary and forwarded without being rebuilt.

pub mod command;
pub mod decode;
pub mod frame;

pub use decode::{
    parse_frame, CodecError, Limits, ProtocolError, ReplyDecoder, Request, RequestDecoder,
};
pub use frame::{encode_command, Frame, Protocol};
