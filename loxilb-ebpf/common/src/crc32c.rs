//! CRC32c (Castagnoli), as SCTP uses it (RFC 9260 appendix A).
