"""The search room: which replacement each layer gets, judged by the user's metric.

``metrics``  what the user measures (built-ins and plug-ins), as a score and its drop
``gated``    every candidate of every layer side by side in one ONNX graph, picked by gate
             inputs: one ONNX Runtime session scores any assignment, no rebuilds
``ladders``  each layer's candidates with MACs, latency alone and sensitivity
``planner``  the greedy path across layers, bisected with end-to-end checks
"""
