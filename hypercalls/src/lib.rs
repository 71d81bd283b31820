//! The hypercall ABI (being written).
#![no_std]
#![forbid(unsafe_code)]
