//! Scenarios of the core driven by hand: no sockets, no clock.
