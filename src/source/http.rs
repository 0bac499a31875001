//! Bundles over HTTP(S) by range requests (to be written: see the network issue).
