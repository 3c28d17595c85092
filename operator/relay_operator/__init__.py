"""mailrelay's control plane: the kopf operator that turns MailRelay and RelayRoute into fleets."""
