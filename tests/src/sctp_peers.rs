//! Real SCTP peers (usrsctp) for the end-to-end tests.
