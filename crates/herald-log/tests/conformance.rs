//! The `EventStore` conformance suite on the embedded log, on the real file system with
//! `fdatasync`, and with small segments so that cases cross segment boundaries.

mod fsync {
    herald_core::event_store_conformance!(|| async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut options = herald_log::Options::new(dir.path());
        options.segment_size_max_bytes = 256 * 1024;
        options.append_size_max_bytes = 128 * 1024;
        options.index_checkpoint_interval_events = 100;
        let log = herald_log::Log::open(options).expect("the log opens");
        (log, dir)
    });
}
