//! The appliance's tests: the journal engine against a reference model,
//! its corruption and edge cases, and the NBD tap server under random and
//! hostile input.

mod journal;
mod native_tap;
mod nbd;
