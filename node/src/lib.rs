//! The tenure node: collector and exporter roles. Not built yet: see issue 4.
