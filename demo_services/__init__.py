"""The demo service kinds, registered under the `failover.services` entry-point group: `kv`
(a key-value store on a paged arena), `bank` (accounts and transfers) and `kvcache` (inference
sessions of token blocks). docs/writing-a-kind.md says how a kind is written.
"""
