"""The worker side, in call order: receive -> dispatch -> execute -> settle."""
