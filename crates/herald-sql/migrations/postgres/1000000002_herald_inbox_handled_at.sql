-- Inbox retention deletes the records handled before a time, oldest first.
CREATE INDEX IF NOT EXISTS herald_inbox_handled_at ON herald_inbox (handled_at);
