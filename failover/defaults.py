"""Every default and hard limit, in one place (docs/design.md, Defaults and limits).

Units are the last part of each name. Code that needs a default imports it from here; nothing
else spells a default number.
"""

from __future__ import annotations

# Failure detection and leases.
HEARTBEAT_MS = 100
FAILURE_TIMEOUT_MS = 400
# A duplica still hears its primary if the primary's stream reached it within this many
# heartbeat intervals (`ReplicaCore.hears_primary`); a primary likewise still hears an
# in-sync member that took entries within them (`Membership._shrink_silent_members`). Well
# under the failure timeout: a duplica asked right after a crash must not still "hear".
HEARD_WITHIN_HEARTBEATS = 2
# An in-sync duplica that has taken no entry for this long while lacking some (it heartbeats
# but cannot take the stream) leaves the in-sync set, so sync writes stop waiting on it.
INSYNC_LAG_MS = 2000
LEASE_MS = 300
# Leases are measured on two hosts' clocks (failover.clock), whose rates differ a little: a
# primary takes its lease to end this much before it was granted to, and the coordinator
# promotes another only this much after it sees the lease end.
LEASE_DRIFT_MARGIN_MS = 30

# Replication batching: bounds per replica set on one host-to-host stream.
BATCH_ENTRIES_MAX = 4096
BATCH_BYTES_MAX = 1 << 20
INFLIGHT_BATCHES_MAX = 8

# Live migration.
MAX_DOWNTIME_MS = 20
MIGRATION_ROUNDS_MAX = 30
MIGRATION_BYTES_FACTOR_MAX = 3

# Requests.
REQUEST_BYTES_MAX = 4 << 20
# Levels of nested lists and maps in one request: deeper ones are refused before they are
# logged (a kind, or `repr` in an error message, may recurse over a value).
REQUEST_DEPTH_MAX = 32
CALL_DEADLINE_MS = 5000
# A call that saw a newer epoch than its replica holds waits this long at most for that
# epoch's assignment to arrive (`Replica._wait_for_epoch`) before it is answered as today.
NEWER_EPOCH_WAIT_MS = 500
# Threads that write replicas' meta files (role and epoch, two fsyncs each): a failover
# promotes every primary a dead host held at once, and their writes overlap up to this.
META_WRITE_THREADS = 8
# A replica being closed waits this long at most for its meta writes to land (a step-down
# taken ahead of the disk); past it, it closes all the same: a stopped process restarted from
# the older meta serves nothing until the coordinator confirms it.
META_CLOSE_WAIT_MS = 2000

# Write-ahead log.
WAL_SEGMENT_BYTES_MAX = 64 << 20
WAL_RECORD_BYTES_MAX = REQUEST_BYTES_MAX + 4096  # one request plus its framing and ids
WAL_FSYNC_POLICY = "batch"
WAL_FSYNC_POLICIES = ("always", "batch", "never")

# Snapshots.
SNAPSHOT_CHUNK_BYTES = 1 << 20
SNAPSHOT_CHUNK_BYTES_MAX = 64 << 20  # a chunk header claiming more is damage, not data
SNAPSHOT_FRAMES_QUEUED_MAX = 8  # received frames waiting for the install's I/O thread
SNAPSHOT_FRAME_TIMEOUT_MS = 30_000  # a snapshot stream that stalls this long is abandoned

# Paged state (the arena kinds migrate fast).
PAGE_BYTES = 4096

# Snapshots and log retention per replica.
SNAPSHOT_EVERY_ENTRIES = 100_000  # take a snapshot after this many applied entries at most
# ... and sooner when the state is small: after as many entries as the last snapshot's bytes
# over SNAPSHOT_STATE_BYTES_PER_ENTRY, but no fewer than SNAPSHOT_MIN_ENTRIES. A restarted
# replica replays its log from its newest snapshot, and a duplica still replaying serves no
# write if promoted: with 100,000 entries between snapshots, restarts replayed 70,000-100,000
# entries (seconds, while the stream kept coming) and crash failovers to such a duplica took
# 100-145 ms. Serialising 1 KiB of kv state costs about what replaying one entry does (4.5 ns
# a byte, 3-5 us an entry), so snapshots then cost at most about what they save.
SNAPSHOT_MIN_ENTRIES = 20_000
SNAPSHOT_STATE_BYTES_PER_ENTRY = 1024
LOG_RETAIN_ENTRIES = 10_000  # entries kept behind a snapshot so lagging duplicas replay

# Exactly-once sessions (part of the replicated state, so bounded and evicted deterministically).
SESSION_REPLIES_PER_CLIENT_MAX = 256  # recorded replies kept per client id (its retry window)
SESSION_CLIENTS_MAX = 10_000  # client ids remembered; the least recently applied is evicted
CLIENT_ID_BYTES_MAX = 128

# Agent request handling.
PENDING_REQUESTS_MAX = 16_384  # writes logged or waiting to be, per replica; more are refused
# Payload bytes of those writes, from admission until answered (at least REQUEST_BYTES_MAX,
# so one request of the largest size always fits); more are refused with RESOURCE_EXHAUSTED.
PENDING_REQUEST_BYTES_MAX = 64 << 20
# Entries applied as one batch before yielding the event loop: ~1 ms of kv puts (measured:
# about 4 us each with the log read; larger batches run slower, out of the CPU's caches).
APPLY_CHUNK_ENTRIES = 256
APPLY_CHUNK_ENTRIES_RECEIVING = 64  # the same while shipped batches wait (they come first)
APPLY_CHUNK_BYTES = 1 << 20  # and at most this much payload per batch (at least one entry)
APPLY_READ_ENTRIES = 256  # entries read back from the log and decoded at a time, to apply
# Shipped entries a duplica keeps decoded in memory to apply (their record bytes plus the
# Python objects' overhead); beyond, applying re-reads them from the log.
SHIPPED_KEPT_BYTES_MAX = 64 << 20
APPLY_YIELD_MS = 5  # while shipped batches wait, a duplica applies one chunk per this long
LINK_BACKOFF_MIN_MS = 20
# A down peer is tried four times a second at most (a refused connection costs little): a
# crashed agent's child is back within about a second, and a link that waited up to a second
# more made its primary's writes wait for its in-sync duplica as long.
LINK_BACKOFF_MAX_MS = 250
# A new primary's probe that a duplica refused because its own assignment naming that
# primary has not arrived yet is sent again this soon (at the next tick after it), not a
# keepalive period later.
REFUSED_PROBE_RETRY_MS = 20
CLIENT_BACKOFF_MIN_MS = 5
CLIENT_BACKOFF_MAX_MS = 250

# Coordinator store (cluster state and its history).
HISTORY_EVENTS_MAX = 100_000  # history rows kept; the oldest are deleted in the same commit
STORE_KEY_BYTES_MAX = 1024  # a state key, UTF-8
STORE_VALUE_BYTES_MAX = 16 << 20  # a state value or one history event's encoded details
# Coordinator leadership (several coordinators on one shared store, e.g. etcd): the leader's
# lease; a leader that cannot renew it within this long stops acting, and a follower takes over
# within about this long of the leader's loss.
LEADER_TTL_MS = 2000
COORDINATOR_ADDRESS_BYTES_MAX = 256  # a coordinator's advertised HOST:PORT, UTF-8
LEADER_TTL_MS_MIN = 500  # below it a loaded leader would lose its lease between keep-alives
LEADER_TTL_MS_MAX = 60_000  # a dead leader is replaced within about this long: keep it short
# The etcd store (docs/etcd.md). One commit is one etcd transaction, never split: etcd must be
# started with --max-txn-ops and --max-request-bytes at least these (the store checks at open),
# so that a commit of many keys (a host death at scale) and the largest value fit.
ETCD_TXN_OPS_MAX = 16_384  # operations in one transaction: state puts and deletes, plus 3
ETCD_REQUEST_BYTES_MAX = 32 << 20  # one encoded transaction (above STORE_VALUE_BYTES_MAX)
ETCD_RESPONSE_BYTES_MAX = 64 << 20  # one reply received; reads are paged below it
ETCD_READ_PAGE_KEYS = 1000  # keys per page of a read (all pages at one revision)
ETCD_CALL_TIMEOUT_MS = 2000  # one etcd call; then the next endpoint is tried
# A commit's call gets ETCD_CALL_TIMEOUT_MS plus its bytes at this rate (a 16 MiB value goes
# through etcd's raft log and fsync: seconds on a loaded machine).
ETCD_COMMIT_BYTES_PER_S_MIN = 2 << 20
ETCD_CAMPAIGN_POLL_MS = 100  # a follower looks for a vacant leader key this often

# Links, streams and clients.
# gRPC experiments turned off in every process of this package (`failover.net.grpc_experiments`
# sets GRPC_EXPERIMENTS unless the process has it; one that sets it, even empty, keeps its
# own): EventEngine's listener, gRPC's default for servers, cost about 80 µs more per stream
# round trip on loopback (one Ship message and its answer, p50 about 410 -> 330 µs), and a
# replicated write crosses four such hops. Its client side stays: without it, a channel
# refused once by a peer still starting took 5 s to connect instead of 1.
GRPC_EXPERIMENTS = "-event_engine_listener"
LINK_OUTBOX_BYTES_MAX = 256 << 20  # queued for one peer host; beyond it the link restarts
# A commit notice to an idle duplica waits at most this long for the link's next message
# (`failover.agent.links`): its state then trails the commit by this much when writes stop.
LINK_NOTICE_DELAY_MS = 5
SHIP_READ_AHEAD_MAX = 64  # Ship messages read ahead of handling on one stream
# A shipped batch of at least this many record bytes is checked as it arrives, on a thread of
# its own, overlapping the writes before it; a smaller one by the job that writes it.
PRECHECK_BYTES_MIN = 64 << 10
# Streams an agent takes at once (issue 13, floods): per peer (the host id in its certificate;
# without TLS, its Ship hello's source_host_id or its connection) and in all; one more gets
# RESOURCE_EXHAUSTED. A peer host keeps one Ship stream (more only while a link restarts).
AGENT_SHIP_STREAMS_PER_PEER_MAX = 8
AGENT_SHIP_STREAMS_MAX = 512
AGENT_SNAPSHOT_STREAMS_PER_PEER_MAX = 4  # InstallSnapshot streams
AGENT_SNAPSHOT_STREAMS_MAX = 32
AGENT_MIGRATION_STREAMS_PER_PEER_MAX = 4  # MigratePages streams
AGENT_MIGRATION_STREAMS_MAX = 16
# ExecuteStream (the streaming data path): the calls one message carries, and their payload
# bytes (one request of REQUEST_BYTES_MAX always fits); a client packs what is queued up to
# these, an agent refuses a message past them (INVALID_ARGUMENT: the stream ends).
STREAM_CALLS_PER_MESSAGE_MAX = 1024
STREAM_MESSAGE_BYTES_MAX = 2 * REQUEST_BYTES_MAX
# Calls of one stream an agent holds unanswered; past it, it reads that stream's next message
# only once some are answered (the client's calls wait in its queue meanwhile).
STREAM_PENDING_CALLS_MAX = 8192
# An agent answers a stream's call by its deadline (the call's deadline_ms, at most this) at
# the latest: UNAVAILABLE, the outcome unknown.
STREAM_CALL_DEADLINE_MS_MAX = 600_000
# ExecuteStream streams an agent serves at once, per connection (a client process: many may
# share one certificate) and in all. A client keeps one per primary it calls.
AGENT_DATA_STREAMS_PER_PEER_MAX = 256
AGENT_DATA_STREAMS_MAX = 4096
# A client stream whose write failed waits this long for the call's status to say why.
CLIENT_STREAM_STATUS_WAIT_MS = 1000
# A stream call's deadline timer that runs this late means the client's event loop was stalled
# (a blocking call, a long pause): an answer that came meanwhile waits unread in gRPC, and the
# call is refused only after this grace, during which the loop reads it (unary Execute keeps
# such an answer: its deadline is gRPC's, off the loop). At most this many graces per call.
CLIENT_STREAM_STALL_MS = 20
CLIENT_STREAM_STALL_GRACE_MS = 250
CLIENT_STREAM_STALL_GRACES_MAX = 3
# Requests one call_many takes (it is as many calls; the replies are held until the last).
CALL_MANY_REQUESTS_MAX = 65_536
# Shipped record bytes read and not yet answered, all Ship streams together: past it a stream
# reads its next message only once its own are answered (each stream still moves).
AGENT_SHIP_INFLIGHT_BYTES_MAX = 256 << 20
CLIENT_ROUTES_BACKOFF_MAX_MS = 1000
# An agent whose coordinator failed a heartbeat tries the next one after a backoff of one
# heartbeat period, doubling up to this many (a follower's hint to the leader: at once).
AGENT_COORDINATOR_BACKOFF_BEATS_MAX = 4
PAGED_ARENA_BYTES_MAX = 1 << 30

# Coordinator.
AGENT_CALL_TIMEOUT_MS = 2000
# Replicas an agent creates at once (an assignment of a service it does not hold: files made,
# meta and log synced on its event loop). The coordinator sends several assignments to a host
# side by side (COORDINATOR_HOST_CALLS_IN_FLIGHT_MAX); eight creations at once held agents'
# loops long enough for their heartbeats to be missed when 300 services were created on a
# loaded machine. Assignments of replicas it holds (promotions) are not limited.
AGENT_CREATES_IN_FLIGHT_MAX = 1
# A HearsPrimary answer from a host the coordinator does not hear now; one it hears is waited
# for as long as it would take to suspect it (`Detector.hears_timeout_ms`).
HEARS_PRIMARY_TIMEOUT_MS = 200
COORDINATOR_HOST_QUEUE_MAX = 10_000  # calls queued for one agent; more are dropped, logged
# Control calls in flight to one agent at once, one per service (a host death promotes
# several services on each survivor together: failover/coordinator/host_caller.py).
COORDINATOR_HOST_CALLS_IN_FLIGHT_MAX = 8
COORDINATOR_QUEUED_CALLS_MAX = 100_000  # calls queued for all agents together; likewise
ROUTE_WATCHERS_MAX = 10_000  # concurrent WatchRoutes streams; more get RESOURCE_EXHAUSTED
ROUTE_WATCH_SERVICES_MAX = 10_000  # services one WatchRoutes may name; more: INVALID_ARGUMENT
# Replicas one heartbeat may report (a host holding more is refused: INVALID_ARGUMENT), and
# DropReplica calls one heartbeat may cause for replicas the records do not give the host
# (the rest wait for a later heartbeat): a forged report of thousands of unknown services
# must not fill the host's queue.
HEARTBEAT_REPLICAS_MAX = 10_000
# Heartbeats the coordinator takes in one round, with one store commit (more wait for the
# next round): a round stays short enough to hold the lock for, whatever the queue.
HEARTBEATS_PER_ROUND_MAX = 64
HEARTBEAT_DROPS_MAX = 64
# Host metrics beyond these are not a real host's: such a heartbeat or registration is
# refused (INVALID_ARGUMENT), so a rogue cannot win placement by claiming them.
HOST_METRIC_BYTES_MAX = 1 << 50  # disk and memory (1 PiB)
HOST_METRIC_CPUS_MAX = 4096
COORDINATOR_HOSTS_MAX = 10_000  # hosts registered; a new one past it gets RESOURCE_EXHAUSTED
COORDINATOR_NOTICES_MAX = 256  # notices the core keeps for the daemon to log (oldest dropped)
# Of a patch command's output, the last this many characters go back to an admin caller.
PATCH_OUTPUT_CHARS_MAX = 4000
# At most one log line per this interval about requests whose bytes do not parse (gRPC logs
# each at ERROR with a traceback, before any role check: a flood would fill the log).
DECODE_ERROR_LOG_INTERVAL_MS = 10_000
# Of an agent's refusal of a patch restart, this many characters go into history.
PATCH_REFUSAL_CHARS_MAX = 300
SWITCHOVER_TIMEOUT_MS = 5000
# A switchover's prepare not answered within this is asked again (the same switchover id: the
# primary joins its own hold and, prepared already, answers at once). Its answer lost once
# held the primary's writes for the whole SWITCHOVER_TIMEOUT_MS, and the gap after that hold
# kept the next attempt off as long again.
PREPARE_RESEND_MS = 500
# A switchover's release (ending its hold) that got no answer is sent again after this,
# doubling up to the max, for as long as the hold could last (SWITCHOVER_TIMEOUT_MS).
RELEASE_RETRY_BACKOFF_MIN_MS = 20
RELEASE_RETRY_BACKOFF_MAX_MS = 500
# How long a read on a new (or restarted) primary waits for the log it inherited to be
# committed and applied before it is refused as Unavailable (the client retries).
READ_FLOOR_TIMEOUT_MS = 1000

# Redundancy: rebuilds and placement.
HOST_DEAD_MS = 10_000  # a host silent this long is dead: its replicas are rebuilt elsewhere
PLACEMENT_POLICY = "worst-fit"  # first-fit, best-fit or worst-fit (failover.core.placement)
# At most this many `building` replicas at once, cluster-wide (count): after a mass failure
# the rest wait for a slot, so rebuilds (each a log replay or a snapshot streamed by a live
# primary) never starve live traffic.
REBUILD_CONCURRENCY_MAX = 32
# And at most this many at once on any one host (count): a new replica's files, fsyncs and
# first log all land on its host's disk. Thirty rebuilds after a host death started at one
# tick, three on each survivor, and a meta write took 710 ms on the shared disk; agents
# missed heartbeats and live hosts were failed over (benchmarks/storm.py).
REBUILD_PER_HOST_MAX = 1
# A service that failed over rebuilds its lost replica no sooner than this after the
# promotion (ms): a host death promotes every primary it held at once, and their rebuilds
# (each a snapshot or a log replay streamed by a primary just promoted) started about 90 ms
# later, while the promotions were still landing and clients finding the new primaries
# (benchmarks/storm.py). The deposed copy's host, back within it, catches up instead.
REBUILD_CALM_MS = 2_000
# A failover in sync mode passes over an in-sync duplica whose state trails its log by more
# than this many entries (it is replaying its log after a restart; about 25 ms of replay)
# when another candidate is ready: the new primary answers no write before it has applied
# everything.
PROMOTE_REPLAY_LAG_ENTRIES_MAX = 5_000
# Background rebalance of primaries (switchovers to hosts with fewer): one at a time, at
# most one started per REBALANCE_GAP_MS (0: never), and none until REBALANCE_CALM_MS have
# passed with no failover in progress (a storm settles first).
REBALANCE_GAP_MS = 2_000
# After an abandoned rebalance move the gap doubles, up to this many times (reset by a move
# that completes): each attempt may hold the service's writes for up to
# SWITCHOVER_TIMEOUT_MS, and a move that keeps failing must not hold them most of the time.
REBALANCE_BACKOFF_DOUBLINGS_MAX = 5
REBALANCE_CALM_MS = 5_000
# A rebalance switches over only to a member that can take over at once, and only while
# every other in-sync member keeps up too (the commit waits for them all): the switchover
# holds writes until the target has the whole log, so a target that lags or cannot write
# would hold them past their deadlines. Its matched index within this many entries of the
# primary's durable index (both as last reported), no replica on its host reporting a full
# disk, and at least this much free disk on its host (as it last reported).
REBALANCE_TARGET_LAG_ENTRIES_MAX = 256
REBALANCE_TARGET_DISK_FREE_BYTES_MIN = 128 << 20
KIND_NEEDS_CPU = 0.1  # cores one replica reserves, unless its kind declares otherwise
KIND_NEEDS_MEMORY_BYTES = 64 << 20
KIND_NEEDS_DISK_BYTES = 256 << 20
CHAOS_DISK_BYTES = 1 << 30  # each agent's tmpfs data dir in a chaos run with disk faults (room
# for the replicas' reserved disk; filling it writes this much to memory)
# The chaos kv workload: few hot keys, so that operations on a key overlap (a stale read
# needs a newer write to miss), and deadlines shorter than a failover, so that some
# operations end with an unknown outcome, which the checker must explain either way.
CHAOS_KEYS = 4
CHAOS_KV_WORKERS = 12
CHAOS_READ_RATIO = 0.5  # plain gets; the rest are puts and cas (each cas after its own get)
CHAOS_OP_DEADLINE_MS = 300  # one kv request, retries included; then its outcome is unknown
# (measured on two cores: kv p99 ~140 ms, a failover stops kv for 380-480 ms, so the
# requests in flight across a failover end unknown)
# Bank transfers keep a longer deadline: exactly-once is checked over subsets of the unknown
# transfers (failover.chaos.checkers.DEFAULT_UNKNOWN_TRANSFERS_MAX), which must stay few.
CHAOS_BANK_OP_DEADLINE_MS = 3000
CHAOS_AFTER_FAULT_READERS = 4  # readers that hammer recent keys during a kill or switchover
CHAOS_AFTER_FAULT_READ_MS = 2000  # ... and for this long after the cluster healed
CHAOS_RECENT_KEYS_MAX = 4  # "recently written": the keys of the last writes invoked
MIGRATION_TIMEOUT_MS = 600_000  # a whole migration, copy and catch-up, before it is abandoned
MIGRATION_DOWNTIME_MS_MAX = 60_000  # the largest max_downtime_ms an operator may ask for
PATCH_COMMAND_TIMEOUT_MS = 300_000  # a patch command run on a host before it restarts
PATCH_RESTART_TIMEOUT_MS = 120_000  # a restarted host back, and its replicas caught up
PATCH_COMMAND_CHARS_MAX = 8192  # a patch command's length (longer: put it in a script)
AGENT_RESTART_DELAY_MS = 100  # between answering Restart and re-executing (the reply leaves)

# The kvcache demo kind (demo_services/kvcache.py): inference sessions of token blocks.
KVCACHE_BLOCK_BYTES_MAX = 1 << 20  # one block's bytes (typical blocks are 16-64 KiB)
KVCACHE_SESSION_BLOCKS_MAX = 65_536  # blocks in one session
KVCACHE_SESSIONS_MAX = 16_384  # sessions held at once (each costs at least 8 KiB of arena)
KVCACHE_SESSION_NAME_BYTES_MAX = 256  # a session name, UTF-8
KVCACHE_READ_BYTES_MAX = 4 << 20  # block bytes in one read_session reply (the rest: page on)
KVCACHE_NEEDS_MEMORY_BYTES = 512 << 20  # what placement reserves per kvcache replica
KVCACHE_NEEDS_DISK_BYTES = 512 << 20  # its log and snapshots

# Live migration: page batches, codecs and the pre-copy planner (the top-level migration/ package).
MIGRATION_BATCH_BYTES = 1 << 20  # raw page bytes per PageBatch message (256 pages of 4 KiB)
MIGRATION_LZ4_LEVEL = -1  # lz4.frame level of pages_lz4: measured ~10% faster than 0, same ratio
MIGRATION_DELTA_CHANGED_BITS_FRACTION_MAX = 0.1  # a re-sent page goes as an XOR delta when at
# most this fraction of its bits changed, else RAW (measured break-even on token-like pages)
MIGRATION_BANDWIDTH_EWMA_WEIGHT = 0.5  # weight of the newest round in the bandwidth estimate
MIGRATION_DIRTY_SHRINK_FRACTION_MIN = 0.1  # a round whose dirty set shrank less than this
# (against the pages it sent) grows the auto-converge throttle
MIGRATION_THROTTLE_INITIAL_MS = 1.0  # delay per source write when auto-converge starts
MIGRATION_THROTTLE_MAX_MS = 32.0  # the throttle doubles per non-shrinking round up to this
MIGRATION_CUT_TIMEOUT_MS = 10_000  # the target's verdict on the cut, while the source is paused
SHIP_MESSAGE_BYTES_MAX = 4 << 20  # shipped records in one Ship message (under the gRPC bound)
MIGRATION_ENCODE_AHEAD = 2  # batches a migration encodes ahead of what its stream has sent
MIGRATION_CUT_OVERHEAD_MS = 3.0  # fixed cost of a migration's paused round, in its prediction
MIGRATION_CUT_BANDWIDTH_FRACTION = 0.5  # its rate against the live rounds' (measured ~half)

# Several coordinators (issue 15): the one leading acts, the others answer with a redirect.
COORDINATOR_TAKEOVER_GRACE_MS = 1000  # after a takeover, no failure detection for this long:
# the agents first find the new leader (they heartbeat to the old one until it fails them)
COORDINATOR_STORE_READ_TIMEOUT_MS = 2000  # a follower's read of the store for status, history
COORDINATOR_LEADER_HINT_TTL_MS = 200  # a follower asks the store who leads at most this often
COORDINATOR_CAMPAIGN_BACKOFF_MIN_MS = 100  # a campaign or a load that failed (the store is
COORDINATOR_CAMPAIGN_BACKOFF_MAX_MS = 2000  # unreachable) is tried again after this, doubling

# Events (issue 17): `failoverctl events`, the coordinator's WatchHistory stream.
HISTORY_WATCHERS_MAX = 1000  # concurrent WatchHistory streams; more get RESOURCE_EXHAUSTED
# Events queued for one watcher and not yet sent; a watcher that falls this far behind is cut
# off (RESOURCE_EXHAUSTED, naming the seq to resume after): it never slows the coordinator.
HISTORY_WATCH_QUEUE_MAX = 1024
HISTORY_WATCH_LAST_MAX = 10_000  # `last` of one WatchHistory (the newest kept events first)
HISTORY_WATCH_PAGE_EVENTS = 500  # events of a watcher's backlog read from the store at a time
EVENTS_LAST = 20  # `failoverctl events` without --since starts with this many kept events
# `failoverctl events --follow` whose stream ended (a new leader, cut off for falling behind)
# resumes after the last event it printed for up to this long, pausing this long in between.
EVENTS_RESUME_TIMEOUT_MS = 30_000
EVENTS_RESUME_PAUSE_MS = 200
WAIT_POLL_CALL_MS = 1000  # `failoverctl wait`: the least deadline of one status poll
STATUS_HISTORY_EVENTS = 1000  # `failoverctl status` finds each service's last event in these

# Hooks (issue 17): allowlisted commands an agent runs after a role change, a failover or a
# migration, in the background; their results go to history with the next heartbeat.
HOOK_TIMEOUT_MS = 10_000  # one hook's run; then it is killed (its process group)
HOOK_OUTPUT_BYTES_MAX = 2048  # of its output, the end kept and recorded in history
HOOKS_RUNNING_MAX = 8  # hooks running at once on one agent; more are skipped, and recorded
HOOKS_PER_EVENT_MAX = 4  # commands one hook event may name
HOOK_RESULTS_QUEUED_MAX = 256  # results an agent keeps until a heartbeat delivers them
HOOK_RESULTS_PER_HEARTBEAT_MAX = 16  # results one heartbeat carries (more: INVALID_ARGUMENT)
# Observability (issue 17): the metrics and health port, the gRPC health service, the logs.
METRICS_CONNECTIONS_MAX = 16  # HTTP connections served at once on --metrics-listen (more wait
# in the listen backlog: a scraper or load balancer that floods it slows only itself)
METRICS_REQUEST_TIMEOUT_MS = 5000  # one HTTP request read, answered and written, or dropped
METRICS_REQUEST_HEADER_BYTES_MAX = 8192  # an HTTP request's line and headers together
HEALTH_WATCHERS_MAX = 64  # gRPC health Watch streams open at once on one daemon
HEALTH_WATCH_POLL_MS = 100  # how often a health Watch looks at the replica's role again
LOG_FORMATS = ("text", "json")
LOG_FORMAT = "text"  # --log-format: lines for people; json is one object per line
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL = "INFO"  # --log-level (the FAILOVER_LOG_LEVEL environment variable as before)
LOG_FIELD_CHARS_MAX = 4096  # one field of a JSON log record (a longer one is cut, marked so)
# The request latency histogram's buckets (seconds): a sync write is ~1-10 ms, a stall is more.
REQUEST_DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0)
WAL_FSYNC_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
STORE_COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
# A failover's unavailability, detection to routes pushed: a lease and a promotion, or seconds.
UNAVAILABILITY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
TOP_INTERVAL_MS = 1000  # failoverctl top: one status and history read per this
TOP_INTERVAL_MS_MIN = 200  # faster would load the coordinator for a picture nobody can read
TOP_EVENTS_MAX = 10  # the newest history events shown under the table


# The crash fast path (issue 16): a supervisor runs the agent's work in a child process and
# tells the coordinator when it exits.
AGENT_INCARNATION_MAX = (1 << 63) - 1  # the child's incarnation, counted on disk by the supervisor
EXIT_CODE_MIN = -128  # an exit report's code: negative for the signal that ended the child,
EXIT_CODE_MAX = 255  # else what it passed to exit
SUPERVISOR_REPORT_TIMEOUT_MS = 2000  # reporting one exit, every coordinator tried, retries included
SUPERVISOR_REPORT_CALL_TIMEOUT_MS = 300  # one call of that report
SUPERVISOR_RESTARTS_MAX = 5  # child exits within SUPERVISOR_RESTART_WINDOW_MS before the
SUPERVISOR_RESTART_WINDOW_MS = 10_000  # supervisor gives up (exits, as a host that stopped);
# systemd's default start limit. 10 in 60 s stopped a host whose child was killed every 6 s.
SUPERVISOR_BACKOFF_MIN_MS = 50  # the wait before a restart, doubling per exit within the
SUPERVISOR_BACKOFF_MAX_MS = 5000  # window, up to this
SUPERVISOR_STOP_TIMEOUT_MS = 10_000  # SIGTERM forwarded to the child: SIGKILL after this
