//! eBPF flow capture: the C program and its aya loader. Not built yet: see issue 5.
