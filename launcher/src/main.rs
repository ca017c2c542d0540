//! `rsdeep`: the launcher binary.
fn main() {}
