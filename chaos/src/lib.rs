//! Real-process fault injection for tenure clusters. Not built yet: see issue 7.
