"""The official code's pieces, written in the test suite as the official projects write them
(RepDistiller, mdistiller), so that tests compare kdlight against an independent reference
rather than against kdlight's own code."""
