//! Deterministic simulation of a tenure cluster. Not built yet: see issue 6.
