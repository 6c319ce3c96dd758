"""semoe.models"""
