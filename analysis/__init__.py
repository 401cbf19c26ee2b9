"""Analysis of attention-output SAEs: head attribution, DFA, induction features, circuits, dashboards."""
