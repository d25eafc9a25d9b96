//! SCTP packet builders for the packet tables.
