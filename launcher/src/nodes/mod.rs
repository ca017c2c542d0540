//! Jobs that span nodes: the ssh runner (`ssh`: starts the other nodes' launchers, streams
//! their output, stops them) and cross-node coordination (`coordinate`: node 0 decides
//! restarts and stops, the other nodes follow through the rendezvous).

pub mod coordinate;
pub mod ssh;
