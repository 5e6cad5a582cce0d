"""Durable storage: the write-ahead log, snapshots and coordinator stores."""
