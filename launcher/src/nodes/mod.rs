//! Jobs that span nodes: the ssh runner (`ssh`: starts the other nodes' launchers, streams
//! their output, stops them), the runners that start every node through one program
//! (`fanout`, with `pdsh` and `mpi`), and cross-node coordination (`coordinate`: node 0
//! decides restarts and stops, the other nodes follow through the rendezvous).

pub mod coordinate;
pub mod fanout;
pub mod mpi;
pub mod pdsh;
pub mod ssh;
