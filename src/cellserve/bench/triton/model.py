"""Silero VAD in Triton's Python backend with ONNX Runtime, the client holding the state: the deployment a
Triton user writes today, the peer `cellserve bench streams --deployments triton` measures. Triton batches
requests dynamically (up to 64); the state travels batch-first ([batch, 2, 128]) as dynamic batching needs."""

import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(os.path.dirname(__file__), "silero_vad.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.sr = np.array(16000, np.int64)

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        states = [pb_utils.get_input_tensor_by_name(r, "state").as_numpy() for r in requests]
        state = np.ascontiguousarray(np.concatenate(states).transpose(1, 0, 2))
        out, state_n = self.session.run(None, {"input": np.concatenate(xs), "state": state, "sr": self.sr})
        state_n = state_n.transpose(1, 0, 2)
        answers, at = [], 0
        for x in xs:
            n = len(x)
            answers.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("output", np.ascontiguousarray(out[at:at + n])),
                pb_utils.Tensor("stateN", np.ascontiguousarray(state_n[at:at + n]))]))
            at += n
        return answers
