"""One call: the call nursery, playout, barge-in, outcomes, admission."""
