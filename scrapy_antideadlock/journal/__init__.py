"""The crash-safe request journal: the extension (:mod:`.extension`) and how it writes a
request and reads it back (:mod:`.codec`)."""

from .codec import decode_payload, encode_payload, to_dict
from .extension import (
                        JOURNAL_KEY,
                        KEEP_PENDING,
                        QUARANTINED,
                        RequestJournal,
                        journal_dir,
                        journal_for,
                        keep_pending,
)

# the names the benchmarks import
_to_dict, _encode_payload = to_dict, encode_payload

__all__ = ["JOURNAL_KEY", "KEEP_PENDING", "QUARANTINED", "RequestJournal", "decode_payload",
           "encode_payload", "journal_dir", "journal_for", "keep_pending", "to_dict"]
