"""`mailrelay up` and `mailrelay graph`: a declared topology on this machine, without a cluster.

The manifests go through the operator's own loading, validation and render step (one code path
from manifest to relay config); this package only adds what a cluster would otherwise provide:
files instead of mounted Secrets and volumes (`layout`), processes instead of pods (`up`), a
terminal table instead of `kubectl get` (`table`), and a picture of the topology (`graph`).
Relay processes are started as subprocesses (`python -m relay relay --config FILE`); nothing
here imports the relay's runtime.
"""
