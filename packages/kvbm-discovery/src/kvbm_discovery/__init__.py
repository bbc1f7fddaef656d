"""kvbm-discovery: who is where (registration, barrier), control messages between the leader
and its workers, and KV event sinks; in-process by default, etcd and NATS for real deployments.

Imports no server client at import time: ``aetcd`` and ``nats`` load with their backend.
"""

# The control messages are kvbm_core's (the runtime's protocol); this package carries them.
from kvbm_core.messages import (
    Completions,
    LoadRecovery,
    Message,
    RestoreAck,
    StoredBlocks,
    StoredBlocksChunk,
    TierSizes,
    WorkerError,
)
from kvbm_discovery.control import ControlChannel, Inbox
from kvbm_discovery.discovery import (
    LEADER,
    WORKER,
    Discovery,
    InstanceInfo,
    MembershipEvent,
    Registration,
    leader_id,
    worker_id,
)
from kvbm_discovery.errors import (
    BarrierTimeoutError,
    DiscoveryError,
    DuplicateInstanceError,
    MessageError,
    ServiceUnavailableError,
)
from kvbm_discovery.event_sink import (
    BufferedEventSink,
    EventBatch,
    SinkStats,
    decode_batch,
    encode_batch,
)
from kvbm_discovery.inproc import (
    InProcControlChannel,
    InProcDiscovery,
    InProcEventSink,
    reset_inproc,
)
from kvbm_discovery.messages import decode, encode
from kvbm_discovery.services import DiscoveryServices, make_etcd_services, make_inproc_services

__all__ = [
    "LEADER",
    "WORKER",
    "BarrierTimeoutError",
    "BufferedEventSink",
    "Completions",
    "ControlChannel",
    "Discovery",
    "DiscoveryError",
    "DiscoveryServices",
    "DuplicateInstanceError",
    "EventBatch",
    "InProcControlChannel",
    "InProcDiscovery",
    "InProcEventSink",
    "Inbox",
    "InstanceInfo",
    "LoadRecovery",
    "MembershipEvent",
    "Message",
    "MessageError",
    "Registration",
    "ServiceUnavailableError",
    "SinkStats",
    "RestoreAck",
    "StoredBlocks",
    "StoredBlocksChunk",
    "TierSizes",
    "WorkerError",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "leader_id",
    "make_etcd_services",
    "make_inproc_services",
    "reset_inproc",
    "worker_id",
]
__version__ = "0.1.0"
