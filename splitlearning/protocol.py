"""The protocol's constants, each written once: what both ends of a channel must agree on (docs/protocol.md)."""

from __future__ import annotations

import enum
import re

from splitlearning.v1 import split_learning_pb2 as pb

PROTOCOL_VERSION = 1

# The full names of the services, as health checking and reflection name them.
SPLIT_SERVICE = pb.DESCRIPTOR.services_by_name["SplitLearningService"].full_name
AGGREGATOR_SERVICE = pb.DESCRIPTOR.services_by_name["AggregatorService"].full_name
VERTICAL_SERVICE = pb.DESCRIPTOR.services_by_name["VerticalService"].full_name

# Metadata of a training stream: the id of the client that opens it, as in its handshake (UTF-8 bytes). The
# server refuses a stream whose id is not the session holder's; a stream without it is taken as the holder's.
CLIENT_ID_METADATA_KEY = "split-client-id-bin"

# The longest session id, client id or group name a peer may send (characters): ids are uuid4 hex (32) on both
# sides. Ids and group names are 1 to MAX_ID_LENGTH letters, digits, '-' or '_': they name folders (a session's
# checkpoints, a group's state), so nothing but these characters ever reaches a path.
MAX_ID_LENGTH = 128
ID_PATTERN = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}")

# Room for the protobuf framing around the tensors of one message, on top of what the cut contract sizes.
MESSAGE_OVERHEAD = 64 * 1024
# Bytes an id takes in VerticalService's Align and Match messages: 32 of a point and 2 of its field's framing, with
# room to spare; both ends size their message limits by it.
PSI_BYTES_PER_ID = 40
# A part's state (weights, optimizer variables) travels in one message to and from the aggregator.
MAX_STATE_BYTES = 256 * 1024 * 1024

# Trailing metadata of a refusal whose cause a program must tell apart from others of the same status, without
# reading the message (written for people, and free to change): one of `Reason`'s values.
REASON_METADATA_KEY = "split-reason"


class Reason(enum.StrEnum):
    """Why a call was refused, for a program (`REASON_METADATA_KEY`); the status and message still say it."""

    # Handshake, FAILED_PRECONDITION: the client's part does not fit the server's (IV shape or dtype, cut mode).
    CUT_MISMATCH = "CUT_MISMATCH"
