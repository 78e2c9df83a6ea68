"""Names of the node and graph metadata the capture passes write (one place, so passes
that read them need not import each other)."""

MODULE_KEY = "lbi_module"  # node meta: dotted path of the innermost module it came from
CAPTURE_KEY = "lbi_capture"  # graph meta: how the graph was captured
MODE_KEY = "lbi_mode_switch"  # node meta: the ModeSwitch module a node calls
MODE_PROBLEM_KEY = "lbi_mode_problem"  # graph meta: why the capture cannot follow .train()/.eval()
SIGNATURE_KEY = "lbi_signature"  # graph meta: an exported forward's parameters (record_signature)
