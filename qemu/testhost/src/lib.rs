//! The pure part of the conformance test host: a reference model of the
//! ABI-level state (`docs/ABI.md` §2.5, §2.6), a serializability checker for
//! concurrent rounds, and a fixed-seed random generator. No hardware, no
//! unsafe: it builds and is unit-tested on the build machine, and the
//! bare-metal binary (`main.rs`) drives it with real HVCs.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod model;
pub mod rng;
pub mod serial;

pub use model::{ErrSet, Mismatch, Model};
